"""The same model served by LitServe, for ``make bench``'s comparison (not a product path).

    python -m serve_demo.serve.litserve_app --mar model-store/shapes-1.0.mar --port 8000

Same archive, same decoding, same model code and response format as the TorchServe handler
(through :class:`serve_demo.core.worker.Worker`); the image arrives as multipart field
``data`` on ``POST /predict``.
"""

from __future__ import annotations

import argparse

import litserve as ls
from fastapi import HTTPException

from serve_demo.core import defaults


class DetectorAPI(ls.LitAPI):
    """Decode, detect, answer in the stock format (as the TorchServe handler does by default)."""

    def __init__(self, mar: str, threads: int, threshold: float) -> None:
        super().__init__()
        self.mar, self.threads, self.threshold = mar, threads, threshold

    def setup(self, device) -> None:
        import torch

        from serve_demo.core.worker import Worker

        torch.set_num_threads(self.threads)
        self.model = Worker.from_archive(self.mar)

    def decode_request(self, request):
        return request["data"].file.read()

    def predict(self, data: bytes):
        from serve_demo.core.imaging import RequestError

        try:
            return self.model.predict(data, threshold=self.threshold, response_format="stock")
        except RequestError as err:
            raise HTTPException(err.code, err.message) from None

    def encode_response(self, output):
        return output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mar", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--workers", type=int, default=1, help="inference worker processes")
    p.add_argument("--threshold", type=float, default=defaults.THRESHOLD)
    args = p.parse_args()
    server = ls.LitServer(DetectorAPI(args.mar, args.threads, args.threshold), accelerator="cpu",
                          workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False,
               log_level="warning")


if __name__ == "__main__":
    main()
