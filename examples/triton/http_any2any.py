"""Send a prompt (and optionally an image, audio or video file) to the `any2any` model over HTTP;
print the text and write the media it returns.

    omniforge serve build/default &
    python examples/triton/http_any2any.py "Make a picture of a harbour" --force image --steps 20 --out outputs/
    python examples/triton/http_any2any.py "Describe this photo" --image photo.png

any2any is a batched model: every input has a leading batch axis of 1 (one request per prompt).
Media go in as the bytes of their files (PNG/JPEG/GIF/BMP/WebP, WAV, GIF/WebP/MP4).
"""

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--url", default="127.0.0.1:8000", help="HTTP address of the server")
    ap.add_argument("--image", type=Path)
    ap.add_argument("--audio", type=Path)
    ap.add_argument("--video", type=Path)
    ap.add_argument("--force", action="append", default=[], choices=["image", "video", "audio"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("outputs"))
    args = ap.parse_args()

    def tensor(name, value, dtype):
        t = httpclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [
        tensor("prompt", np.array([[args.prompt.encode()]], dtype=object), "BYTES"),
        tensor("steps", np.array([[args.steps]], np.int32), "INT32"),
        tensor("seed", np.array([[args.seed]], np.uint64), "UINT64"),
        tensor("max_new_tokens", np.array([[args.max_new_tokens]], np.int32), "INT32"),
    ]
    if args.force:
        inputs.append(tensor("force", np.array([[m.encode() for m in args.force]], dtype=object), "BYTES"))
    for name in ("image", "audio", "video"):
        path = getattr(args, name)
        if path is not None:
            inputs.append(tensor(name, np.array([[path.read_bytes()]], dtype=object), "BYTES"))

    client = httpclient.InferenceServerClient(args.url, network_timeout=600)
    try:
        result = client.infer("any2any", inputs)
    except InferenceServerException as exc:  # a bad request: one sentence, HTTP status 400
        print(f"error ({exc.status()}): {exc.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()

    print(result.as_numpy("text")[0, 0].decode())
    for event in result.as_numpy("signals")[0]:
        print("signal:", json.loads(event))
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(result.as_numpy("images")[0]):  # (H, W, 3) floats in [0, 1]
        Image.fromarray((img * 255).round().astype(np.uint8)).save(args.out / f"image_{i}.png")
    for i, frames in enumerate(result.as_numpy("videos")[0]):  # (F, H, W, 3)
        pics = [Image.fromarray((f * 255).round().astype(np.uint8)) for f in frames]
        pics[0].save(args.out / f"video_{i}.gif", save_all=True, append_images=pics[1:], duration=125, loop=0)
    rate = int(result.as_numpy("sample_rate")[0, 0])
    for i, wav in enumerate(result.as_numpy("audios")[0]):  # (samples,) in [-1, 1]
        with wave.open(str(args.out / f"audio_{i}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    for warning in result.as_numpy("warnings")[0]:
        print("warning:", warning.decode(), file=sys.stderr)
    print(f"media written to {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
