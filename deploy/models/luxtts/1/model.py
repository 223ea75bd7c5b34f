"""LuxTTS behind its tensor contract: text and a reference recording in, 48 kHz speech out.

Untested here: LuxTTS (the ``zipvoice`` package from its repository) is not on the package
index and its weights come from the Hugging Face Hub. deploy/models/tts_small serves the same
contract with a voice that installs from PyPI, and is what the test suite runs.
"""

from __future__ import annotations

import tempfile
import threading
from typing import Any

import numpy as np

from kernelport.errors import invalid

DEFAULTS = {"rms": 0.01, "t_shift": 0.9, "num_steps": 4, "speed": 1.0,
            "return_smooth": 0, "ref_duration": 5, "seed": 0}  # fmt: skip
# LuxTTS's vocoder writes 48 kHz, or its 24 kHz output when asked for the smoother one
RATE_48K, RATE_SMOOTH = 48000, 24000


def _scalar(inputs: dict[str, np.ndarray], name: str) -> float:
    value = inputs.get(name)
    return (
        float(DEFAULTS[name]) if value is None or value.size == 0 else float(value.reshape(-1)[0])
    )


def _suffix(data: bytes) -> str:
    # librosa picks its decoder by content, but audioread (MP3) wants a real file name
    return ".wav" if data[:4] in (b"RIFF", b"RIFX") else ".mp3"


class Model:
    def load(self, config: Any) -> None:
        try:
            import torch
            from huggingface_hub import snapshot_download
            from zipvoice.luxvoice import LuxTTS
        except ImportError as exc:
            raise RuntimeError(
                f"{exc}: LuxTTS needs its code (pip install -r requirements.txt in its "
                "repository, which provides zipvoice) and pip install 'kernelport[fetch]'"
            ) from exc
        params = config.parameters
        weights = snapshot_download(
            str(params.get("hf_repo", "YatharthS/LuxTTS")),
            revision=str(params.get("hf_revision", "main")),
        )
        device = str(params.get("device", "cuda"))
        self.torch = torch
        self.tts = LuxTTS(weights, device=device, threads=int(params.get("threads", 4)))
        self.lock = threading.Lock()  # the seed is torch's global generator

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            text = inputs["text"].astype(np.uint8).tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid(f"text is not UTF-8: {exc}") from exc
        prompt = inputs["prompt_audio"].astype(np.uint8).tobytes()
        if not text.strip() or not prompt:
            raise invalid("LuxTTS needs non-empty text and prompt_audio")
        smooth = bool(int(_scalar(inputs, "return_smooth")))
        with tempfile.NamedTemporaryFile(suffix=_suffix(prompt)) as audio_file:
            audio_file.write(prompt)
            audio_file.flush()
            with self.lock:
                self.torch.manual_seed(int(_scalar(inputs, "seed")))
                encoded = self.tts.encode_prompt(
                    audio_file.name,
                    duration=int(_scalar(inputs, "ref_duration")),
                    rms=_scalar(inputs, "rms"),
                )
                wav = self.tts.generate_speech(
                    text,
                    encoded,
                    num_steps=int(_scalar(inputs, "num_steps")),
                    t_shift=_scalar(inputs, "t_shift"),
                    speed=_scalar(inputs, "speed"),
                    return_smooth=smooth,
                )
        return {
            "audio": np.asarray(wav.numpy(), np.float32).reshape(-1),
            "sample_rate": np.array([RATE_SMOOTH if smooth else RATE_48K], np.int32),
        }
