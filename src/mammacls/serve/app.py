"""The HTTP face of a ``PredictionService``: the page at ``/``, the versioned REST API under ``/v1``,
``/healthz``, and the generated OpenAPI description (``/openapi.json``, browsable at ``/docs``), all
served by the package: nothing is loaded from the internet.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time,
and the token check depends on a local ``HTTPBearer``."""


import hmac
import html
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mammacls import __version__
from mammacls.errors import MammaclsError
from mammacls.serve.batching import Overloaded
from mammacls.serve.service import PredictionService, TooManyFrames
from mammacls.serve.uploads import FILES_FIELD, UploadLimits, UploadRefused, read_upload

# The page may load only what this server serves (its own scripts, styles and the overlays it returns).
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILES_FIELD],
    "properties": {FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "PNG, JPEG, BMP, TIFF or DICOM files (a cine loop: every frame)"}}}}}}}


@dataclass(frozen=True)
class ServerSettings:
    token: str | None = None
    limits: UploadLimits = UploadLimits()
    cors: tuple[str, ...] = ()


def _refusal(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(service: PredictionService, settings: ServerSettings = ServerSettings()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await service.start()
        yield
        await service.stop()  # uvicorn stopped taking requests and let those in flight finish

    app = FastAPI(title="mammacls", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Breast ultrasound classification (benign / malignant / normal). "
                              "Research use only, not for diagnosis.")
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])
    _add_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="mammacls serve --token")

    def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise StarletteHTTPException(401, "missing or wrong token: send Authorization: Bearer <token>",
                                         headers={"WWW-Authenticate": "Bearer"})

    def same_origin(request: Request) -> None:
        """No other web page may drive the API through a visitor's browser, unless ``--cors`` names it."""
        origin = request.headers.get("origin")
        if origin is None or origin in settings.cors:
            return
        if urlsplit(origin).netloc != request.headers.get("host", ""):
            raise StarletteHTTPException(403, f"cross-origin request from {origin[:80]} refused "
                                              "(mammacls serve --cors ORIGIN allows one)")

    guarded = [Depends(same_origin), Depends(authorised)]

    @app.get("/healthz", tags=["service"], summary="Liveness: the model is loaded")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__, "model": service.predictor.ref.name,
                "backend": service.predictor.backend.name, "token_required": settings.token is not None,
                "queued_frames": service.batcher.queued}

    @app.get("/v1/model", tags=["model"], summary="The model card's public summary",
             dependencies=guarded)
    async def model() -> dict:
        return service.summary()

    @app.post("/v1/predict", tags=["predict"], summary="Classify uploaded scans", openapi_extra=_UPLOAD_SCHEMA,
              dependencies=guarded,
              description="The records of `mammacls predict --json`: `predictions` (one per image or frame, "
                          "with `status` ok / uncertain / rejected and a `reason`), `cine` (one summary per "
                          "DICOM cine loop) and `errors` (unreadable files). 200 when anything was "
                          "predicted, 422 when no file could be read. Overlays come back as PNG data URIs.")
    async def predict(request: Request,
                      explain: Annotated[Literal["gradcam"] | None, Query(
                          description="gradcam: a Grad-CAM overlay per image (`explanation`)")] = None,
                      lesion_map: Annotated[bool, Query(
                          description="the predicted lesion over each image (`lesion_map`; mask-guided models)")
                      ] = False) -> JSONResponse:
        upload = await read_upload(request.headers.get("content-type"), request.headers.get("content-length"),
                                   request.stream(), settings.limits)
        explain = explain or upload.fields.get("explain") or None
        lesion = lesion_map or upload.fields.get("lesion_map", "").lower() in ("1", "true", "yes", "on")
        if explain not in (None, "gradcam"):
            raise UploadRefused(400, f"explain={explain!r}: the one explanation is gradcam")
        if not upload.files:
            raise UploadRefused(400, f"no files: send the scans in the multipart field '{FILES_FIELD}'")
        document = await service.predict(upload.files, gradcam=explain == "gradcam", lesion=lesion)
        if document["predictions"]:
            return JSONResponse(document)
        return JSONResponse({**document, "error": "no file could be read: " + "; ".join(
            f"{e['path']}: {e['error']}" for e in document["errors"])[:400]}, status_code=422)

    _add_page(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal is one line of JSON (``{"error": ...}``) with a 4xx; a 500 only for our own bugs."""
    @app.exception_handler(UploadRefused)
    async def refused(_request, exc: UploadRefused):
        return _refusal(exc.status, exc.message)

    @app.exception_handler(Overloaded)
    async def overloaded(_request, exc: Overloaded):
        return _refusal(503, f"server busy ({exc}): retry shortly", headers={"Retry-After": "1"})

    @app.exception_handler(MammaclsError)
    async def mammacls_error(_request, exc: MammaclsError):
        return _refusal(413 if isinstance(exc, TooManyFrames) else 400, exc.with_option_names())

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return _refusal(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _refusal(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _add_page(app: FastAPI, service: PredictionService) -> None:
    static = resources.files("mammacls.serve") / "static"
    page = (static / "index.html").read_text(encoding="utf-8").replace(
        "{{model}}", html.escape(service.predictor.ref.name)).replace("{{version}}", __version__)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mammacls API",
                                   swagger_js_url="/static/apidocs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/apidocs/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg",
                                   swagger_ui_parameters={"validatorUrl": None})  # its badge would call out

    # Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI writes), from the fastapi-offline wheel: no CDN
    apidocs = resources.files("fastapi_offline") / "static"
    app.mount("/static/apidocs", StaticFiles(directory=str(apidocs)), name="apidocs")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
