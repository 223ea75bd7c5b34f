"""Demo Python model: softmax over logits, and the most likely class."""

import numpy as np


class Model:
    def load(self, config):
        self.temperature = float(config.parameters.get("temperature", 1.0))

    def execute(self, inputs):
        # Called with the whole batch: LOGITS is [rows, classes].
        logits = inputs["LOGITS"].astype(np.float64) / self.temperature
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        return {
            "PROBABILITIES": probs.astype(np.float32),
            "CLASS": probs.argmax(axis=1).astype(np.int64)[:, None],
        }
