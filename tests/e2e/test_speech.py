"""The LuxTTS tensor contract served by deploy/models/tts_small, over kernelport.v1 and V2."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
import wave
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, running_server
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "deploy" / "models" / "tts_small"
CLIENT = ROOT / "examples" / "tts_client.py"
TEXT = "KernelPort speaks. The quick brown fox jumps over the lazy dog."
RATE = 22050  # en_US-joe-medium's rate, as its voice config declares
MIN_RMS = 0.01  # speech from this voice sits near 0.05; silence or clicks are far below


def _client() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("tts_client", CLIENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("speech")
    shutil.copytree(MODEL, repo / "tts_small", ignore=shutil.ignore_patterns("__pycache__"))
    with running_server(repo, repo, wait_for="ready") as running:
        yield running


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def test_kernelport_v1_speech_is_audible_and_seeded(server: RunningServer) -> None:
    client = _client()
    audio, rate = client.synthesize(server.grpc_url, "tts_small", TEXT, b"", seed=0, speed=1.0)
    assert rate == RATE
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.5 < audio.size / rate < 10  # a dozen words, not a blip and not a runaway
    assert _rms(audio) > MIN_RMS
    assert np.abs(audio).max() <= 1.5
    again, _ = client.synthesize(server.grpc_url, "tts_small", TEXT, b"", seed=0, speed=1.0)
    assert again.tobytes() == audio.tobytes()
    other, _ = client.synthesize(server.grpc_url, "tts_small", TEXT, b"", seed=1, speed=1.0)
    assert other.tobytes() != audio.tobytes()
    faster, _ = client.synthesize(server.grpc_url, "tts_small", TEXT, b"", seed=0, speed=2.0)
    assert faster.size < 0.7 * audio.size


def _v2(server: RunningServer, text: bytes, **scalars: np.ndarray) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    arrays = {
        "text": np.frombuffer(text, np.uint8),
        "prompt_audio": np.zeros(0, np.uint8),
        **scalars,
    }
    datatypes = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32",
                 np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}  # fmt: skip
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatypes[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("tts_small", inputs)
    return {name: result.as_numpy(name) for name in ("audio", "sample_rate")}


def test_v2_matches_kernelport_v1_for_the_same_seed(server: RunningServer) -> None:
    # Every optional scalar of the contract is accepted; those a VITS voice has no use for
    # leave the waveform as it is.
    contract = {
        "rms": np.array([0.01], np.float32),
        "t_shift": np.array([0.9], np.float32),
        "num_steps": np.array([4], np.int32),
        "speed": np.array([1.0], np.float32),
        "return_smooth": np.array([0], np.int32),
        "ref_duration": np.array([5], np.int32),
        "seed": np.array([0], np.int64),
    }
    out = _v2(server, TEXT.encode(), **contract)
    assert out["sample_rate"].dtype == np.int32 and out["sample_rate"].tolist() == [RATE]
    assert out["audio"].dtype == np.float32 and _rms(out["audio"]) > MIN_RMS
    v1, _ = _client().synthesize(server.grpc_url, "tts_small", TEXT, b"", seed=0, speed=1.0)
    assert out["audio"].tobytes() == v1.tobytes()
    assert _v2(server, TEXT.encode())["audio"].tobytes() == v1.tobytes()  # seed defaults to 0


def test_bad_text_is_invalid_argument(server: RunningServer) -> None:
    with pytest.raises(InferenceServerException, match="text is not UTF-8"):
        _v2(server, b"caf\xe9")
    client = _client()
    with pytest.raises(grpc.RpcError) as info:
        client.synthesize(server.grpc_url, "tts_small", "   ", b"", seed=0, speed=1.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text is empty" in info.value.details()


def test_example_client_writes_a_wav(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    done = subprocess.run(
        [sys.executable, str(CLIENT), "--url", server.grpc_url, "--text", TEXT, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with wave.open(str(out), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, RATE)
        frames = wav.readframes(wav.getnframes())
    pcm = np.frombuffer(frames, "<i2").astype(np.float32) / 32767
    assert pcm.size / RATE > 1.5
    assert _rms(pcm) > MIN_RMS
