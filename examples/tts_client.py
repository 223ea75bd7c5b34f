"""Synthesize speech over kernelport.v1 gRPC and write it as a 16-bit mono WAV file.

    python examples/tts_client.py --url localhost:8001 --model tts_small \
        --text "Hello from KernelPort." --out hello.wav [--prompt reference.wav] [--seed 3]

The request follows the LuxTTS tensor contract (docs/speech.md): ``text`` and
``prompt_audio`` as U8 byte tensors, the optional sampling scalars, and back ``audio`` (F32
mono) with its ``sample_rate`` (I32). Needs grpcio and kernelport (for the generated messages).
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import grpc
import numpy as np

from kernelport.schema import pb

V1 = pb.kernelport_v1


def _tensor(request: object, name: str, dtype: str, array: np.ndarray) -> None:
    request.inputs.add(  # type: ignore[attr-defined]
        name=name, dtype=V1.DType.Value(dtype), shape=list(array.shape), data=array.tobytes()
    )


def synthesize(
    url: str, model: str, text: str, prompt: bytes, seed: int, speed: float, timeout: float = 120
) -> tuple[np.ndarray, int]:
    """The waveform (float32, [-1, 1]) and its sample rate."""
    request = V1.InferRequest(model=model)
    _tensor(request, "text", "U8", np.frombuffer(text.encode("utf-8"), np.uint8))
    _tensor(request, "prompt_audio", "U8", np.frombuffer(prompt, np.uint8))
    _tensor(request, "speed", "F32", np.array([speed], np.float32))
    _tensor(request, "seed", "I64", np.array([seed], np.int64))
    with grpc.insecure_channel(url) as channel:
        infer = channel.unary_unary(
            "/kernelport.v1.InferenceService/Infer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=V1.InferResponse.FromString,
        )
        response = infer(request, timeout=timeout)
    outputs = {t.name: t for t in response.outputs}
    audio = np.frombuffer(outputs["audio"].data, np.float32)
    rate = int(np.frombuffer(outputs["sample_rate"].data, np.int32)[0])
    return audio, rate


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--model", default="tts_small")
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompt", type=Path, help="reference audio (WAV/MP3) for LuxTTS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("speech.wav"))
    args = parser.parse_args(argv)
    prompt = args.prompt.read_bytes() if args.prompt else b""
    audio, rate = synthesize(args.url, args.model, args.text, prompt, args.seed, args.speed)
    write_wav(args.out, audio, rate)
    print(f"{args.out}: {audio.size / rate:.2f} s at {rate} Hz")


if __name__ == "__main__":
    main()
