"""serve: the shipped or a chosen model behind a local web page and REST API."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mammacls.choices import Device
from mammacls.cli.common import _console, _errors, app, choice_option


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Model cache name, folder, .safetensors file or 'default' (default: the model chosen with "
             "mammacls use, else the shipped one).")] = None,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on; anything but loopback needs --token.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8765,
    token: Annotated[Optional[str], typer.Option(
        metavar="TOKEN", envvar="MAMMACLS_TOKEN", show_envvar=True,
        help="Bearer token every /v1 request must carry (Authorization: Bearer TOKEN).")] = None,
    workers: Annotated[int, typer.Option(help="Threads decoding uploads (one process holds the model and "
                                              "batches every request's frames together).")] = 2,
    device: Annotated[Device, choice_option(
        Device, help="Where the network runs (cuda: PyTorch; auto: CUDA when there is a GPU).")] = Device.auto,
    cors: Annotated[Optional[list[str]], typer.Option(
        metavar="ORIGIN", help="Allow this web origin to call the API from a browser (repeatable; none by default).")] = None,
    max_upload_mb: Annotated[int, typer.Option(help="Largest request body, in MB.")] = 64,
    max_files: Annotated[int, typer.Option(help="Most files in one request.")] = 32,
    max_batch: Annotated[int, typer.Option(help="Most frames in one network call.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a frame waits for others to fill a batch.")] = 5.0,
    max_queue: Annotated[int, typer.Option(
        help="Frames waiting for the network, all requests together; beyond it: 503 and Retry-After.")] = 512,
) -> None:
    """A local web page (drag and drop, probabilities, explanations, CSV) and a REST API (/v1/predict,
    /v1/model, /healthz; OpenAPI at /docs) over one model opened once. Uploads stay in memory."""
    from mammacls.serve.server import check_settings, listen
    from mammacls.serve.uploads import UploadLimits

    limits = UploadLimits(max_bytes=max_upload_mb * 1024 * 1024, max_files=max_files)
    with _errors():
        check_settings(host, port, token, limits, workers)
        from mammacls.serve.app import ServerSettings, create_app
        from mammacls.serve.service import PredictionService, ServiceOptions

        service = PredictionService.open(ServiceOptions(model=model, device=device, workers=workers, max_batch=max_batch,
                                                   max_wait_ms=max_wait_ms, max_queue=max_queue))
        sock = listen(host, port)
    console = _console()
    if service.hint:
        console.print(service.hint, style="yellow", markup=False, soft_wrap=True)
    application = create_app(service, ServerSettings(token=token, limits=limits, cors=tuple(cors or ())))

    def ready(url: str) -> None:
        described = service.model
        console.print(f"mammacls serve: {url}  (model {described['name']}, {described['backend']}; "
                      f"API {url}/docs){'; token required' if token else ''}. Ctrl+C stops.",
                      markup=False, soft_wrap=True)

    from mammacls.serve.server import serve_forever

    serve_forever(application, sock, ready)
