"""The model behind the server: opened once, uploads decoded on a thread pool, frames from every request
batched together for the network, answers in the records of ``mammacls predict --json``."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mammacls import CLASSES, __version__
from mammacls.errors import MammaclsError
from mammacls.inference.pixels import InMemoryFile
from mammacls.inference.predictor import Frame, Prediction, Predictor
from mammacls.schemas import PREDICTIONS
from mammacls.serve.batching import DynamicBatcher


@dataclass(frozen=True)
class ServiceOptions:
    model: str | None = None
    device: str = "auto"
    workers: int = 2  # threads decoding uploads
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 512  # frames waiting for the network, all requests together


class TooManyFrames(MammaclsError):
    """A request whose frames alone exceed the queue (a long cine loop): it could never be taken."""


class PredictionService:
    """One opened model serving one app: its decoding threads and its batcher live from ``start`` to
    ``stop`` (the app's lifespan)."""

    def __init__(self, predictor: Predictor, options: ServiceOptions = ServiceOptions(), hint: str | None = None):
        self.predictor, self.options, self.hint = predictor, options, hint
        self.batcher = DynamicBatcher(predictor.classify, max_batch=options.max_batch,
                                      max_wait_s=options.max_wait_ms / 1000, max_queue=options.max_queue)
        self._decoders = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="mammacls-decode")
        self._explainer = None
        self._explain_lock = threading.Lock()  # one explanation at a time: Grad-CAM holds gradients in memory

    @classmethod
    def open(cls, options: ServiceOptions) -> PredictionService:
        """Open ``options.model`` once: ONNX Runtime on the CPU, PyTorch on CUDA when there is a GPU."""
        from mammacls.inference.model_files import check_finished, resolve_model
        from mammacls.runtime import open_backend

        ref = resolve_model(options.model)
        check_finished(ref, False)  # a model whose training did not finish has no gate: never served
        runner, hint = open_backend(ref, options.device, "auto")
        return cls(Predictor(ref, runner, calibrated=ref.card.calibration is not None), options, hint)

    @property
    def model(self) -> dict[str, Any]:
        described = self.predictor.describe()
        described.pop("path", None)  # where the server keeps its files is nobody's business
        return described

    def summary(self) -> dict[str, Any]:
        """The card's public summary for ``GET /v1/model``."""
        card = self.predictor.ref.card
        pre, pretrained = card.preprocessing, card.provenance.pretrained
        calibration = card.calibration
        return {
            "name": self.predictor.ref.name, "version": __version__, "classes": list(CLASSES), "arch": card.arch,
            "members": card.members, "mask_guided": card.mask_guided, "sha256": card.weights.sha256,
            "input": {"img_size": pre.img_size, "channels": pre.in_chans, "mean": list(pre.mean), "std": list(pre.std),
                      "resize": pre.resize, "range": pre.input_range},
            "calibration": None if calibration is None else {
                "method": calibration.method, "temperature": calibration.temperature,
                "class_temperatures": None if calibration.class_temperatures is None
                else list(calibration.class_temperatures),
                "fitted_on": calibration.fitted_on, "val_before": calibration.val_before,
                "val_after": calibration.val_after},
            "refusal": {"min_confidence": card.refusal.min_confidence,
                        "out_of_distribution": card.refusal.ood is not None},
            "intended_use": card.provenance.intended_use,
            "training_sources": sorted(card.provenance.data.get("sources", {})),
            "licences": {"mammacls": "MIT",
                         "pretrained_weights": pretrained.get("terms") if isinstance(pretrained, dict) else None},
            "backend": self.predictor.backend.name,
        }

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._decoders.shutdown(wait=True)

    async def predict(self, files: list[InMemoryFile], *, gradcam: bool = False, lesion: bool = False) -> dict:
        """The document ``mammacls predict --json`` prints, for uploaded files (one record per input)."""
        from mammacls.predict import decode_file, records_in_file_order

        explaining = gradcam or lesion
        if lesion and not self.predictor.ref.card.mask_guided:
            raise MammaclsError(f"model {self.predictor.ref.name} was not trained with --mask-guided: "
                                "it draws no lesion map")
        loop = asyncio.get_running_loop()
        # the first explanation imports torch and loads the weights: off the event loop, which keeps serving
        predictor = await loop.run_in_executor(self._decoders, self._explaining) if explaining else self.predictor
        decoded = await asyncio.gather(*(loop.run_in_executor(self._decoders, decode_file, predictor, f) for f in files))
        frames = [frame for _, file_frames, _ in decoded for frame in file_frames]
        if len(frames) > self.options.max_queue:
            raise TooManyFrames(f"{len(frames)} frames in one request; the server takes at most "
                                f"{self.options.max_queue} (mammacls serve --max-queue)")
        if explaining:
            answers = await loop.run_in_executor(self._decoders, self._explain, frames, gradcam, lesion)
        else:
            answers = await self.batcher.submit(frames)
        _, cine, errors = records_in_file_order(decoded, iter(answers))
        counts = {status: sum(a.status == status for a in answers) for status in ("ok", "uncertain", "rejected")}
        return {"schema": PREDICTIONS, "model": {**self.model, "backend": predictor.backend.name},
                "status_counts": counts, "calibrated": self.predictor.calibrated,
                "predictions": [a.to_record() for a in answers], "cine": [c.to_record() for c in cine], "errors": errors,
                "inputs": {"received": len(files), "frames": len(frames)}}

    def _explaining(self) -> Predictor:
        """A PyTorch predictor that keeps full-size frames (opened on the first request that asks)."""
        with self._explain_lock:
            if self._explainer is None:
                from mammacls.runtime import TorchBackend

                runner = self.predictor.backend
                if not hasattr(runner, "explain"):  # ONNX: open the same weights in PyTorch, on the CPU
                    runner = TorchBackend(self.predictor.ref, "cpu")
                self._explainer = Predictor(self.predictor.ref, runner, calibrated=self.predictor.calibrated,
                                            keep_originals=True)
            return self._explainer

    def _explain(self, frames: list[Frame], gradcam: bool, lesion: bool) -> list[Prediction]:
        from mammacls.overlays import Overlays, as_data_uri

        if not frames:
            return []
        overlays = Overlays(self._explainer, gradcam, lesion, as_data_uri)
        with self._explain_lock:
            return [r for start in range(0, len(frames), self.options.max_batch)
                    for r in overlays.classify(frames[start:start + self.options.max_batch])]

