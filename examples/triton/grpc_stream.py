"""Stream text from the `llm` model over gRPC, as it is generated.

    omniforge serve build/default &        # or a Triton container on a repository from `omniforge triton`
    python examples/triton/grpc_stream.py "A dog runs" --max-new-tokens 32

The llm model is decoupled: one request, many responses. Each response carries a piece of text;
the last one (its finish_reason is set) carries every generated token id.
"""

import argparse
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of the server")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [
        tensor("prompt", np.array([args.prompt.encode()], dtype=object), "BYTES"),
        tensor("max_new_tokens", np.array([args.max_new_tokens], np.int32), "INT32"),
        tensor("temperature", np.array([args.temperature], np.float32), "FP32"),
        tensor("seed", np.array([args.seed], np.uint64), "UINT64"),
    ]
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("llm", inputs)
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                print(f"\nerror: {error.message()}", file=sys.stderr)
                return 1
            print(result.as_numpy("text")[0].decode(), end="", flush=True)
            finish = result.as_numpy("finish_reason")[0].decode()
            if finish:
                ids = result.as_numpy("token_ids").tolist()
                print(f"\n[{len(ids)} tokens, finish: {finish}]")
                return 0
    finally:
        client.stop_stream()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
