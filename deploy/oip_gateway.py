"""The Open Inference Protocol (KServe v2) in front of TorchServe 0.12, over REST and gRPC, as stock clients
(tritonclient, the kserve SDK) speak it.

TorchServe 0.12 hands `POST /v2/models/{m}/infer` to the handler, which answers it, but the rest of the
protocol is missing or wrong there:
- its OIP gRPC service lives in package `org.pytorch.serve.grpc.openinference`, not `inference`, so every
  stock gRPC client gets UNIMPLEMENTED (and it would drop `raw_input_contents`, which tritonclient always uses);
- `GET /v2/models/{m}` and `/v2/models/{m}/ready` answer 404, `/v2/health/ready` is hard-coded true, and
  `/v2/models/{m}/versions/{v}/infer` answers 501 (404 without `ts_open_inference_protocol`).

This gateway answers those from TorchServe's management API (readiness = READY workers, metadata = the
handler's own description) and forwards every infer, REST or gRPC, to `/predictions/{m}[/{v}]` as an OIP
body with the binary-data extension, so the handler sees one format. `POST /predictions/{m}[/{v}]` passes
through unchanged, so TorchServe's own REST clients (deploy.client) work through the gateway too.

Tokens: by default the caller's token goes through as it came, and TorchServe checks it. TorchServe makes
fresh random keys at every start, so replicas behind one balancer never share one; with `--client-token
FILE` (a mounted Secret, re-read when it changes) the gateway checks that token itself and talks to its own
TorchServe with that server's key. Health routes need no token (probes cannot rotate one).

On SIGTERM the gateway drains: `/v2/health/ready` answers 503 at once, so balancers and Kubernetes stop
sending, while requests keep being served for `--drain-s` seconds; then it exits.

    python -m deploy.oip_gateway [--inference URL] [--management URL] [--key-file key_file.json]
                                 [--http 127.0.0.1:8090] [--grpc 127.0.0.1:8091] [--client-token FILE]
                                 [--drain-s 0]
"""

from __future__ import annotations

import argparse
import asyncio
import email.policy
import hmac
import json
import signal
import struct
import sys
import time
from email.message import Message
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from deploy.keys import fresh_key, is_refused_key
from deploy.management import DeployError, Management, NotFound, Unreachable, handler_description
from handlers.contract import KEY_FILE, KeyFileError, read_key
from handlers.protocols import BINARY_HEADER, NUMERIC

MAX_MESSAGE = 16 * 1024 * 1024
READY_TTL_S = 1.0  # readiness is re-read at most this often; probes and clients may ask far more often
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
              422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
              504: grpc.StatusCode.DEADLINE_EXCEEDED, 507: grpc.StatusCode.RESOURCE_EXHAUSTED}
# gRPC's typed contents fields, for clients that send `contents` instead of `raw_input_contents`.
CONTENTS = {"BYTES": "bytes_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents"}


class GatewayError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Upstream:
    """The upstream server: infer through the inference API, readiness and metadata through management."""

    def __init__(self, inference: str, management: str, key_file: Path, client_token: Path | None = None) -> None:
        self.inference = inference.rstrip("/")
        self.management_url = management.rstrip("/")
        self.key_file = key_file
        self.client_token = client_token
        self.draining = False
        self.session: aiohttp.ClientSession | None = None
        self.metadata_cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.ready_cache: dict[tuple[str, str | None], tuple[float, bool]] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def management(self) -> Management:
        try:
            token = read_key(self.key_file, "management")
        except KeyFileError as e:
            raise GatewayError(503, f"the gateway cannot read TorchServe's management key: {e}") from None
        return Management(self.management_url, token, self.key_file)

    def inference_key(self) -> str:
        try:
            return read_key(self.key_file, "inference")
        except KeyFileError as e:
            raise GatewayError(503, f"the gateway cannot read TorchServe's inference key: {e}") from None

    def check_token(self, authorization: str | None) -> None:
        """Only callers holding the token get answers: --client-token's, else TorchServe's inference key."""
        if self.client_token is None:
            expected, hint = self.inference_key(), "the 'inference' key from key_file.json"
        else:
            try:  # read per call: Kubernetes rewrites a mounted Secret in place when it is rotated
                expected, hint = self.client_token.read_text().strip(), "the service token (its Secret)"
            except OSError as e:
                raise GatewayError(503, f"the gateway cannot read its client token {self.client_token}: "
                                   f"{e.strerror}") from None
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise GatewayError(401, f"missing or wrong token: send {hint} as 'Authorization: Bearer <token>' "
                               "(gRPC: metadata 'authorization')")

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """With --client-token, the caller's token is checked here and swapped for this server's own key."""
        if self.client_token is None:
            return headers
        self.check_token(next((v for k, v in headers.items() if k.lower() == "authorization"), None))
        kept = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return {**kept, "Authorization": f"Bearer {self.inference_key()}"}

    async def call(self, method: str, path: str, **params: Any) -> Any:
        def run() -> Any:
            try:
                return self.management().call(method, path, timeout=10, **params)
            except NotFound as e:
                raise GatewayError(404, str(e)) from None
            except Unreachable as e:
                raise GatewayError(503, str(e)) from None
            except DeployError as e:
                raise GatewayError(502, str(e)) from None
        return await asyncio.to_thread(run)

    async def live(self) -> bool:
        try:
            await self.call("GET", "/models", limit=1)
        except GatewayError:
            return False
        return True

    async def model_ready(self, model: str, version: str | None) -> bool:
        """A version is ready when at least max(1, minWorkers) of its workers are READY."""
        cached = self.ready_cache.get((model, version))
        if cached and time.monotonic() - cached[0] < READY_TTL_S:
            return cached[1]
        try:
            described = (await self.call("GET", f"/models/{model}" + (f"/{version}" if version else "")))[0]
            ready_workers = sum(w.get("status") == "READY" for w in described.get("workers", []))
            ready = ready_workers >= max(1, int(described.get("minWorkers") or 1))
        except GatewayError:
            ready = False
        self.ready_cache[(model, version)] = (time.monotonic(), ready)
        return ready

    async def server_ready(self) -> bool:
        if self.draining:
            return False
        try:
            models = [m["modelName"] for m in (await self.call("GET", "/models", limit=1000)).get("models", [])]
        except GatewayError:
            return False
        return bool(models) and all(await asyncio.gather(*(self.model_ready(m, None) for m in models)))

    async def metadata(self, model: str, version: str | None) -> dict[str, Any]:
        versions = [str(v["modelVersion"]) for v in await self.call("GET", f"/models/{model}/all")]
        if version is None:
            version = str((await self.call("GET", f"/models/{model}"))[0]["modelVersion"])
        elif version not in versions:
            raise GatewayError(404, f"model {model!r} has no version {version!r} (registered: {versions})")
        if (model, version) not in self.metadata_cache:
            described = await self.call("GET", f"/models/{model}/{version}", customized="true")
            try:
                tensors = (handler_description(described) or {})["serving"]["open_inference"]
            except (KeyError, TypeError):
                raise GatewayError(501, f"model {model!r} {version} does not describe its tensors; it needs this "
                                   "project's handler (handlers/) to answer Open Inference metadata") from None
            self.metadata_cache[(model, version)] = tensors
        return {"name": model, "versions": versions, "platform": "pytorch_torchserve",
                **self.metadata_cache[(model, version)]}

    async def infer(self, model: str, version: str | None, body: bytes,
                    headers: dict[str, str]) -> tuple[int, bytes]:
        url = f"{self.inference}/predictions/{model}" + (f"/{version}" if version else "")
        headers = self.upstream_headers(headers)
        status, answer = await self.post(url, body, headers)
        if self.client_token is not None and is_refused_key(status, answer):
            # Our own key, renewed since it was read (deploy/keys.py): once more with the new one.
            stale = headers["Authorization"].removeprefix("Bearer ")
            key = await asyncio.to_thread(fresh_key, self.key_file, "inference", stale)
            if key is not None:
                status, answer = await self.post(url, body, {**headers, "Authorization": f"Bearer {key}"})
        if status == 413 and not answer:  # TorchServe's frontend says nothing more
            answer = json.dumps({"error": f"the request body is {len(body)} bytes, over TorchServe's "
                                          "max_request_size (config.properties); send a smaller or more compressed "
                                          "image"}).encode()
        # TorchServe refuses a token with 400 InvalidKeyException; the protocol's answer is 401 / UNAUTHENTICATED.
        return (401 if is_refused_key(status, answer) else status), answer

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        assert self.session is not None
        try:
            async with self.session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read()
        except aiohttp.ClientError as e:
            raise GatewayError(503, f"TorchServe at {self.inference} did not answer ({type(e).__name__}); "
                               "retry, or check that it runs") from None


def form_mistake(content_type: str, body: bytes) -> GatewayError | None:
    """Bodies TorchServe's frontend answers with a 500 (ErrorDataDecoderException) though the client is at fault:
    raw bytes sent as a URL-encoded form (curl --data-binary without a Content-Type) and multipart bodies it cannot
    split into named fields."""
    if content_type == "application/x-www-form-urlencoded":
        return GatewayError(415, "the body was sent as application/x-www-form-urlencoded (curl's default for -d and "
                                 "--data-binary); send image bytes with 'Content-Type: application/octet-stream' "
                                 "(or image/png, image/jpeg), or JSON with 'Content-Type: application/json'")
    if content_type.startswith("multipart/"):
        # compat32, not policy.HTTP: the modern header parser takes seconds on one long header (fuzz: a 43 KB
        # Content-Disposition took 2.8 s, blocking the event loop); compat32 reads the same params in milliseconds.
        message = BytesParser(policy=email.policy.compat32).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace") + body)
        parts = message.get_payload() if message.is_multipart() else None
        if not parts or message.defects or any(
                not isinstance(p, Message) or not p.get_param("name", header="content-disposition")
                for p in parts):
            return GatewayError(400, "the multipart body could not be split into named fields; send one part "
                                     "per image with 'Content-Disposition: form-data; name=\"data\"' (curl -F "
                                     "data=@image.png), or the image bytes alone with 'Content-Type: "
                                     "application/octet-stream'")
    return None


def error_message(status: int, body: bytes) -> str:
    """The handler's {"error": ...} (OIP) or TorchServe's {"message": ...}; the raw text otherwise."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    if isinstance(parsed, dict):
        for key in ("error", "message"):
            if isinstance(parsed.get(key), str):
                return parsed[key]
    return json.dumps(parsed)[:500]


# --- REST ----------------------------------------------------------------------------------------------
def rest_app(upstream: Upstream) -> web.Application:
    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def guarded(handler: Any, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as e:
            return error(e.status, e.message)
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"the request body is over the gateway's limit of {MAX_MESSAGE} bytes; send a "
                              "smaller or more compressed image")

    def version_of(request: web.Request) -> str | None:
        return request.match_info.get("version")

    async def live(request: web.Request) -> web.Response:
        ok = await upstream.live()
        return web.json_response({"live": ok}, status=200 if ok else 503)

    async def ready(request: web.Request) -> web.Response:
        ok = await upstream.server_ready()
        body = {"ready": ok, **({"draining": True} if upstream.draining else {})}
        return web.json_response(body, status=200 if ok else 503)

    async def server_metadata(request: web.Request) -> web.Response:
        upstream.check_token(request.headers.get("Authorization"))
        return web.json_response(SERVER_METADATA)

    async def model_metadata(request: web.Request) -> web.Response:
        upstream.check_token(request.headers.get("Authorization"))
        return web.json_response(await upstream.metadata(request.match_info["model"], version_of(request)))

    async def model_ready(request: web.Request) -> web.Response:
        model = request.match_info["model"]
        ok = await upstream.model_ready(model, version_of(request))
        return web.json_response({"name": model, "ready": ok}, status=200 if ok else 503)

    async def forward(request: web.Request, headers: tuple[str, ...]) -> web.Response:
        forwarded = {k: v for k, v in request.headers.items() if k.lower() in headers}
        payload = await request.read()
        mistake = await asyncio.to_thread(form_mistake, request.content_type, payload)
        if mistake is not None:
            upstream.check_token(request.headers.get("Authorization"))  # no hints for callers without a token
            raise mistake
        status, body = await upstream.infer(request.match_info["model"], version_of(request), payload, forwarded)
        return web.Response(status=status, body=body, content_type="application/json")

    async def infer(request: web.Request) -> web.Response:
        return await forward(request, ("authorization", "content-type", BINARY_HEADER))

    async def predictions(request: web.Request) -> web.Response:
        return await forward(request, ("authorization", "content-type"))

    app = web.Application(client_max_size=MAX_MESSAGE)
    routes = [("GET", "/v2/health/live", live), ("GET", "/v2/health/ready", ready), ("GET", "/v2", server_metadata)]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [("GET", prefix, model_metadata), ("GET", prefix + "/ready", model_ready),
                   ("POST", prefix + "/infer", infer)]
    routes += [("POST", "/predictions/{model}", predictions), ("POST", "/predictions/{model}/{version}", predictions)]
    for method, path, handler in routes:
        app.router.add_route(method, path, lambda r, h=handler: guarded(h, r))
    return app


SERVER_METADATA = {"name": "torchserve-oip-gateway", "version": "1", "extensions": ["binary_tensor_data"]}


# --- gRPC ----------------------------------------------------------------------------------------------
def to_http(request: pb.ModelInferRequest) -> tuple[bytes, dict[str, str]]:
    """A gRPC infer request -> the REST body with the binary-data extension (same tensors, same bytes)."""
    inputs, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        raw = request.raw_input_contents[i] if i < len(request.raw_input_contents) else contents_bytes(tensor)
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                       "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    header: dict[str, Any] = {"inputs": inputs, "parameters": parameters(request.parameters)}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {BINARY_HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """Typed `contents` (the kserve SDK's choice) -> the raw little-endian layout of `raw_input_contents`."""
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        return b""
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return np.asarray(list(values), dtype=NUMERIC[tensor.datatype]).tobytes()


def parameters(params: Any) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in params.items()
            if v.WhichOneof("parameter_choice")}


def to_grpc(body: dict[str, Any]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=body.get("model_name", ""),
                                     model_version=str(body.get("model_version", "")), id=body.get("id", ""))
    for out in body.get("outputs", []):
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        if out["datatype"] == "BYTES":
            encoded = [str(v).encode() for v in out["data"]]
            response.raw_output_contents.append(b"".join(struct.pack("<I", len(v)) + v for v in encoded))
        else:
            response.raw_output_contents.append(np.asarray(out["data"], dtype=NUMERIC[out["datatype"]]).tobytes())
    return response


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    @staticmethod
    def token(context: grpc.aio.ServicerContext) -> str | None:
        return next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)

    async def fail(self, context: grpc.aio.ServicerContext, status: int, message: str) -> None:
        await context.abort(GRPC_CODES.get(status, grpc.StatusCode.INTERNAL), message)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=await self.upstream.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.upstream.server_ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.upstream.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        try:
            self.upstream.check_token(self.token(context))
        except GatewayError as e:
            await self.fail(context, e.status, e.message)
        return pb.ServerMetadataResponse(**SERVER_METADATA)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            self.upstream.check_token(self.token(context))
            meta = await self.upstream.metadata(request.name, request.version or None)
        except GatewayError as e:
            await self.fail(context, e.status, e.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        body, headers = to_http(request)
        token = self.token(context)
        if token:
            headers["Authorization"] = token
        try:
            status, answer = await self.upstream.infer(request.model_name, request.model_version or None, body,
                                                       headers)
        except GatewayError as e:
            await self.fail(context, e.status, e.message)
        if status != 200:
            await self.fail(context, status, error_message(status, answer))
        return to_grpc(json.loads(answer))


# --- the process -------------------------------------------------------------------------------------
def address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    upstream = Upstream(args.inference, args.management, args.key_file, args.client_token)
    await upstream.start()
    runner = web.AppRunner(rest_app(upstream), access_log=None)
    await runner.setup()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(upstream), server)
    try:
        await web.TCPSite(runner, *args.http).start()
        if server.add_insecure_port("{}:{}".format(*args.grpc)) == 0:
            raise OSError(f"cannot bind {args.grpc[0]}:{args.grpc[1]}")
    except OSError as e:
        await runner.cleanup()
        await upstream.close()
        raise SystemExit(f"error: the gateway cannot listen ({e}); is the port in use? pass other "
                         "--http/--grpc HOST:PORT") from None
    await server.start()
    print(f"OIP gateway: REST http://{args.http[0]}:{args.http[1]}  gRPC {args.grpc[0]}:{args.grpc[1]}  -> "
          f"TorchServe {args.inference}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if args.drain_s > 0:
        upstream.draining = True
        print(f"OIP gateway: draining for {args.drain_s:g} s (ready answers 503)", flush=True)
        await asyncio.sleep(args.drain_s)
    await server.stop(grace=5)
    await runner.cleanup()
    await upstream.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inference", default="http://127.0.0.1:8080", help="TorchServe's inference API")
    p.add_argument("--management", default="http://127.0.0.1:8081", help="TorchServe's management API (loopback)")
    p.add_argument("--key-file", type=Path, default=Path(KEY_FILE),
                   help="TorchServe's key_file.json (the directory it was started from)")
    p.add_argument("--http", type=address, default=("127.0.0.1", 8090), help="REST HOST:PORT")
    p.add_argument("--grpc", type=address, default=("127.0.0.1", 8091), help="gRPC HOST:PORT")
    p.add_argument("--client-token", type=Path, default=None,
                   help="file holding the token callers must send (e.g. a mounted Kubernetes Secret); the gateway "
                        "then calls TorchServe with its own key. Default: callers send TorchServe's key")
    p.add_argument("--drain-s", type=float, default=0.0,
                   help="on SIGTERM, answer ready=503 but keep serving this many seconds before exiting")
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
