"""Runs the kserve SDK's REST and gRPC clients against a gateway, in a process of its own, and prints what
they got as JSON. A process of its own because kserve and tritonclient.grpc both register the `inference`
protobuf package, and one process cannot hold both.

    python -m tests.kserve_sdk_probe REST_HOST:PORT GRPC_HOST:PORT TOKEN IMAGE TENSOR.npy
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ARGS, sys.argv = sys.argv[1:], sys.argv[:1]  # kserve parses sys.argv when imported
import kserve as ks  # noqa: E402


async def probe(rest_address: str, grpc_address: str, token: str, image: bytes, tensor: np.ndarray) -> dict:
    def request(kind: str) -> Any:
        if kind == "bytes":
            inp = ks.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([image], dtype=object))
        else:
            inp = ks.InferInput("input", list(tensor.shape), "FP32")
            inp.set_data_from_numpy(tensor.astype(np.float32))
        return ks.InferRequest(model_name="digits", infer_inputs=[inp])

    def top(answer: Any) -> list[str]:
        labels = {o.name: o.as_numpy() for o in answer.outputs}["labels"][0]
        return [x.decode() if isinstance(x, bytes) else str(x) for x in labels]

    base = f"http://{rest_address}"
    rest = ks.InferenceRESTClient(ks.RESTConfig(protocol="v2", retries=0))
    channel = ks.InferenceGRPCClient(grpc_address, retries=0)
    out: dict[str, Any] = {
        "rest_live": await rest.is_server_live(base), "rest_ready": await rest.is_server_ready(base),
        "rest_model_ready": await rest.is_model_ready(base, "digits"),
        "grpc_live": await channel.is_server_live(), "grpc_ready": await channel.is_server_ready(),
        "grpc_model_ready": await channel.is_model_ready("digits"),
    }
    for kind in ("bytes", "tensor"):
        out[f"rest_{kind}"] = top(await rest.infer(base, request(kind), model_name="digits",
                                                   headers={"authorization": f"Bearer {token}"}))
        out[f"grpc_{kind}"] = top(await channel.infer(request(kind), headers=(("authorization", f"Bearer {token}"),)))
    try:
        await rest.infer(base, request("bytes"), model_name="digits", headers={})
    except Exception as e:  # the SDK raises httpx.HTTPStatusError
        out["rest_no_token"] = str(e)
    try:
        await channel.infer(request("bytes"), headers=())
    except grpc.RpcError as e:
        out["grpc_no_token"] = e.code().name
    await rest.close()
    await channel.close()
    return out


def main() -> None:
    rest_address, grpc_address, token, image, tensor = ARGS
    result = asyncio.run(probe(rest_address, grpc_address, token, Path(image).read_bytes(), np.load(tensor)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
