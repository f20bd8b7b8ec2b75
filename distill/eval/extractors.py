"""Feature extractors for FID / KID / IS / precision-recall, registered with torch-fidelity.

* ``inception-v3-compat``: torch-fidelity's standard Inception (the only extractor whose FIDs are
  comparable with papers). Its weights come from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``) or an explicit
  ``feature_extractor_weights`` path; offline without either, :func:`make_extractor` says exactly
  where to put the file instead of failing inside a download.
* ``digits`` (registered as ``distill-digits``): a small CNN trained by distill on sklearn digits
  (:func:`train_digits_extractor`; weights shipped in ``distill/assets``). It reads uint8 RGB images
  of any size, converts them to gray 16x16 in [-1, 1], and gives 64-d penultimate features
  (``feat64``) and 10 logits (``logits_unbiased``, for IS). Its FIDs are NOT comparable with
  Inception FIDs; every report names the extractor.

Run ``python -m distill.eval.extractors`` to retrain the digits extractor and print its held-out
accuracy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import register_feature_extractor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_WEIGHTS = ASSETS / "digits_extractor.safetensors"
DIGITS_NAME = "distill-digits"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class DigitsNet(nn.Module):
    """Conv net for 16x16 gray digits: two conv stages, a 64-d feature layer, 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 64))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(64, 10))

    @staticmethod
    def preprocess(x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float gray (B, 1, 16, 16) in [-1, 1]."""
        x = x_uint8.float() / 255.0
        x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (16, 16):
            x = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False,
                                          antialias=x.shape[-1] > 16)
        return x * 2 - 1

    def forward(self, x: torch.Tensor):
        feat = self.body(x)
        return feat, self.head(feat)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of :class:`DigitsNet` (features ``feat64``, ``logits_unbiased``)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from safetensors.torch import load_file

        path = feature_extractor_weights_path or DIGITS_WEIGHTS
        if not Path(path).is_file():
            raise FileNotFoundError(f"Digits extractor weights not found at {path}; run "
                                    "`python -m distill.eval.extractors` to train them.")
        self.net = DigitsNet()
        self.net.load_state_dict(load_file(str(path)))
        self.requires_grad_(False).eval()

    @staticmethod
    def get_provided_features_list():
        return ("feat64", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "feat64", "kid": "feat64", "prc": "feat64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8:
            raise TypeError(f"{DIGITS_NAME} expects uint8 images (B, 3, H, W), got {x.dtype}.")
        feat, logits = self.net(self.net.preprocess(x))
        out = {"feat64": feat, "logits_unbiased": logits}
        return tuple(out[f] for f in self.features_list)


try:
    register_feature_extractor(DIGITS_NAME, DigitsFeatureExtractor)
except ValueError:  # already registered (module reloaded)
    pass


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inception_cache_path() -> Path:
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return Path(torch_home) / "hub" / "checkpoints" / INCEPTION_FILE


def extractor_weights(name: str, weights: str | None = None) -> Path:
    """The weights file an extractor will read; FileNotFoundError (saying where to put it) when absent."""
    if name == "digits":
        path = Path(weights) if weights else DIGITS_WEIGHTS
    elif name == "inception-v3-compat":
        path = Path(weights) if weights else inception_cache_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path}. Offline, download {INCEPTION_FILE} "
                "(torch-fidelity's release asset) on a machine with internet and either place it at that "
                "path or pass --feature-extractor-weights PATH (eval.feature_extractor_weights in a config).")
    else:
        raise ValueError(f"Unknown feature extractor {name!r}; choose 'digits' or 'inception-v3-compat'.")
    if not path.is_file():
        raise FileNotFoundError(f"Feature extractor weights for {name!r} not found at {path}.")
    return path


def make_extractor(name: str, weights: str | None = None):
    """(torch-fidelity extractor instance, registered name, weights file, features for fid/isc)."""
    path = extractor_weights(name, weights)
    if name == "digits":
        ext = DigitsFeatureExtractor(DIGITS_NAME, ["feat64", "logits_unbiased"],
                                     feature_extractor_weights_path=path)
        return ext, DIGITS_NAME, path
    if name == "inception-v3-compat":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        ext = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
        return ext.eval(), "inception-v3-compat", path
    raise ValueError(f"Unknown feature extractor {name!r}; choose 'digits' or 'inception-v3-compat'.")


def fid_layer(name: str) -> str:
    return "feat64" if name == "digits" else "2048"


# ---------------------------------------------------------------------- training the digits net
def digits_split(seed: int = 0):
    """sklearn digits at 16x16 as uint8 RGB, split 80/20 (stratified) into train and held-out."""
    from sklearn.model_selection import train_test_split

    from ..data import digits

    ds = digits(16)
    x = ((ds.x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = ds.labels
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed,
                                      stratify=y.numpy())
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def train_digits_extractor(out_path=DIGITS_WEIGHTS, epochs: int = 40, seed: int = 0) -> float:
    """Train :class:`DigitsNet` (random 1-px shifts), save safetensors, return held-out accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_split(seed)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    xin = DigitsNet.preprocess(xtr)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xin), generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xin[b], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb)[1], ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        # Rescale the feature layer so that features of all digits have unit mean variance (FIDs of
        # order 1-100); the head is scaled inversely, so logits are unchanged (ReLU is homogeneous).
        feats = net.body(DigitsNet.preprocess(torch.cat([xtr, xte])))
        c = 1.0 / feats.std(0).mean()
        net.body[-1].weight.mul_(c)
        net.body[-1].bias.mul_(c)
        net.head[1].weight.div_(c)
        acc = (net(DigitsNet.preprocess(xte))[1].argmax(1) == yte).float().mean().item()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_path))
    return acc


def digits_accuracy(weights=DIGITS_WEIGHTS, seed: int = 0) -> float:
    """Held-out accuracy of saved digits-extractor weights."""
    from safetensors.torch import load_file

    _, _, xte, yte = digits_split(seed)
    net = DigitsNet()
    net.load_state_dict(load_file(str(weights)))
    net.eval()
    with torch.no_grad():
        return (net(DigitsNet.preprocess(xte))[1].argmax(1) == yte).float().mean().item()


if __name__ == "__main__":
    accuracy = train_digits_extractor()
    print(f"digits extractor: held-out accuracy {accuracy:.4f} -> {DIGITS_WEIGHTS}")
