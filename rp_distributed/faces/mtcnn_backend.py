"""MTCNN (Zhang et al. 2016): a cascade of three small nets, P-Net over an image pyramid (a 12 px window), then
R-Net (24 px) and O-Net (48 px) on the candidates, O-Net also giving 5 landmarks in insightface order.

Weights: the P/R/O-Net state dicts that ``facenet-pytorch``'s wheel ships (``facenet_pytorch/data/{p,r,o}net.pt``,
MIT), read with ``torch.load(weights_only=True)``. The package itself is not imported: its detection code needs
torchvision's compiled NMS, which a CPU build of torch does not have from the package index, and it pins an old
torch (so it is installed with ``--no-deps``). The nets below are its modules (same layers, same parameter names);
the cascade is its ``detect_face``, in numpy and OpenCV, with the candidates of stages 2 and 3 cut zero-padded where
they leave the image (as the original MTCNN does).

Its 12 px window is why it is here: faces down to ~12 px at its input (6 px with the image magnified 2x), below
CenterFace's reliable floor of ~16-20 px. ``max_face`` stops the pyramid at a face size, so a pass kept on small-face
duty costs a fraction of a full pyramid.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..model_sources import installed_path
from .backends import BaseDetector, ModelFilesMissing
from .centerface_backend import nms
from .types import DetectedFace

WEIGHTS = ("pnet.pt", "rnet.pt", "onet.pt")
FACTOR = 0.709  # the pyramid's step (face size x 1.41 per level), MTCNN's own
STAGE_THRESHOLDS = (0.6, 0.7)  # P-Net and R-Net, MTCNN's own; O-Net's is the pass threshold
DEFAULT_THRESHOLD = 0.9  # O-Net's score for a backend or pass that names none
MEAN, SCALE = 127.5, 0.0078125  # input normalisation the nets were trained with


def weights_folder(folder: Path | None = None) -> Path:
    """``folder`` (default: facenet-pytorch's installed ``data``) once it holds the three nets' weights."""
    folder = folder if folder is not None else installed_path("facenet_pytorch", "data")
    missing = [w for w in WEIGHTS if folder is None or not (Path(folder) / w).is_file()]
    if missing:
        raise ModelFilesMissing("mtcnn", folder, missing, "pip install --no-deps facenet-pytorch==2.6.0 (its wheel "
                                "ships the MTCNN weights)")
    return Path(folder)


def _nets():
    import torch
    from torch import nn

    def conv(i, o, k):
        return nn.Conv2d(i, o, kernel_size=k)

    class PNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = conv(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = conv(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = conv(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.conv4_2 = conv(32, 2, 1), conv(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = conv(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2, self.pool2 = conv(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = conv(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = conv(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2, self.pool2 = conv(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3, self.pool3 = conv(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = conv(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)

    return PNet, RNet, ONet


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares about their centres (MTCNN's ``rerec``)."""
    out = boxes.copy()
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    side = np.maximum(w, h)
    out[:, 0] += w / 2 - side / 2
    out[:, 1] += h / 2 - side / 2
    out[:, 2], out[:, 3] = out[:, 0] + side, out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w, h = out[:, 2] - out[:, 0] + 1, out[:, 3] - out[:, 1] + 1
    out[:, :4] += reg[:, :4] * np.stack([w, h, w, h], axis=1)
    return out


def _crops(image: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """Each box cut from ``image`` (zero outside it) and resized to side x side: N x 3 x side x side, normalised."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), 3, side, side), np.float32)
    for k, b in enumerate(np.trunc(boxes[:, :4]).astype(int)):
        x0, y0, x1, y1 = b
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        if bw < 2 or bh < 2:
            continue
        patch = np.zeros((bh, bw, 3), np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1 + 1, w), min(y1 + 1, h)
        if sx1 > sx0 and sy1 > sy0:
            patch[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        interp = cv2.INTER_AREA if bw > side else cv2.INTER_LINEAR
        out[k] = cv2.resize(patch, (side, side), interpolation=interp).transpose(2, 0, 1)
    return (out - MEAN) * SCALE


def _nms_min(boxes: np.ndarray, scores: np.ndarray, overlap: float) -> np.ndarray:
    """NMS by intersection over the smaller box (MTCNN's last step: a box inside a larger face is dropped)."""
    order, keep = np.argsort(-scores, kind="stable"), []
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + 1, 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + 1, 0, None)
        order = rest[iw * ih <= overlap * np.minimum(areas[i], areas[rest])]
    return np.array(keep, int)


class MTCNN:
    """``detect(image, threshold, max_face)``: faces from 12 px (at the image's own size) up to ``max_face`` px."""

    min_face = 12.0  # P-Net's window

    def __init__(self, folder: Path | None = None):
        import torch

        folder = weights_folder(folder)
        self.nets = []
        for net, file in zip(_nets(), WEIGHTS):
            module = net()
            module.load_state_dict(torch.load(folder / file, map_location="cpu", weights_only=True))
            self.nets.append(module.eval())

    def _forward(self, net, batch: np.ndarray):
        import torch

        with torch.inference_mode():
            outs = [net(torch.from_numpy(batch[i:i + 512])) for i in range(0, len(batch), 512)]
        return [np.concatenate([o[j].numpy() for o in outs]) for j in range(len(outs[0]))]

    def _proposals(self, image: np.ndarray, max_face: float | None) -> np.ndarray:
        """P-Net over the pyramid: rows x0, y0, x1, y1, score, 4 regressions, in image pixels."""
        h, w = image.shape[:2]
        largest = min(h, w) if max_face is None else min(min(h, w), max_face)
        found, scale = [], 1.0
        while largest * scale >= self.min_face:  # at this level a face of 12/scale px fills P-Net's window
            small = cv2.resize(image, (int(w * scale + 1), int(h * scale + 1)),
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            blob = ((small.astype(np.float32) - MEAN) * SCALE).transpose(2, 0, 1)[None]
            reg, prob = self._forward(self.nets[0], np.ascontiguousarray(blob))
            ys, xs = np.nonzero(prob[0, 1] >= STAGE_THRESHOLDS[0])
            if len(ys):
                q = np.stack([xs, ys], axis=1).astype(np.float32)
                boxes = np.concatenate([np.floor((2 * q + 1) / scale), np.floor((2 * q + 12) / scale),
                                        prob[0, 1, ys, xs][:, None], reg[0][:, ys, xs].T], axis=1)
                found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
            scale *= FACTOR
        if not found:
            return np.zeros((0, 9), np.float32)
        boxes = np.concatenate(found)
        return boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]

    def detect(self, image: np.ndarray, threshold: float, max_face: float | None = None) -> list[DetectedFace]:
        boxes = self._proposals(image, max_face)
        if not len(boxes):
            return []
        boxes = _square(_regress(boxes[:, :5], boxes[:, 5:9]))
        reg, prob = self._forward(self.nets[1], _crops(image, boxes, 24))
        keep = prob[:, 1] > STAGE_THRESHOLDS[1]
        boxes, reg = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], axis=1), reg[keep]
        if not len(boxes):
            return []
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        reg, points, prob = self._forward(self.nets[2], _crops(image, boxes, 48))
        keep = prob[:, 1] >= threshold
        boxes, reg, points = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], axis=1), reg[keep], points[keep]
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        marks = np.stack([bw[:, None] * points[:, :5] + boxes[:, :1] - 1,
                          bh[:, None] * points[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        boxes = _regress(boxes, reg)
        pick = _nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        return [DetectedFace(box=boxes[i, :4].astype(np.float32), score=float(boxes[i, 4]),
                             landmarks=marks[i].astype(np.float32)) for i in pick]


class MTCNNDetector(BaseDetector):
    """MTCNN alone (``detection.backend: mtcnn``): the whole pyramid, from 12 px faces to the image's short side,
    at O-Net's ``cfg.threshold`` (0: 0.9). Its pyramid sees every face size, so a large image is not tiled."""

    name = "mtcnn"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._mtcnn = MTCNN()
        self.threshold = float(cfg.threshold) if cfg.threshold > 0 else DEFAULT_THRESHOLD

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        return self._mtcnn.detect(image, self.threshold)

    def needs_tiles(self, shape: tuple[int, ...]) -> bool:
        return False
