"""The same model served by LitServe, for ``make bench``'s comparison (not a product path).

    python -m serve_demo.litserve_app --mar model-store/shapes-1.0.mar --port 8000

Same archive, same decoding, same model code and response format as the TorchServe handler
(through :class:`serve_demo.evaluate.ArchiveModel`); the image arrives as multipart field
``data`` on ``POST /predict``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    import litserve as ls
    import torch
    from fastapi import HTTPException

    from .evaluate import ArchiveModel
    from .imaging import RequestError

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mar", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    args = p.parse_args()

    class DetectorAPI(ls.LitAPI):
        def setup(self, device) -> None:
            torch.set_num_threads(args.threads)
            self.model = ArchiveModel(Path(args.mar))

        def decode_request(self, request):
            return request["data"].file.read()

        def predict(self, data: bytes):
            try:
                return self.model.predict(data, threshold=args.threshold, response_format="stock")
            except RequestError as err:
                raise HTTPException(err.code, err.message) from None

        def encode_response(self, output):
            return output

    server = ls.LitServer(DetectorAPI(), accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False,
               log_level="warning")


if __name__ == "__main__":
    main()
