"""fastml.patch on torchvision's (or timm's, or Hugging Face's) models, which nobody here wrote:
exactness, then speed.

For each model (random weights, 100 classes), a deep copy is patched (``fastml.patch``, or with
``--fx`` ``fastml.patch(model, fx=True)``) and compared with the unpatched original:

- exactness, float64, batch 2: the output, the input's gradient and every parameter's gradient
  after a backward, in train, eval and train mode again, and the state_dict (running statistics
  included) after it all. The gap is measured normwise, ||patched - torch|| / ||torch||, beside
  the gap torch itself shows between two ways of computing the same model (the original on a
  channels-last copy): a deep, unnormalised network amplifies every rounding (inception_v3 at
  init: outputs of 1.8e7 in eval; its float64 channels-last copy differs from it by 1.4e-7),
  so no fixed tolerance says what rounding allows. A model
  passes where fastml's gap is at most ``SLACK`` times torch's own, or below 1e-12;
- speed, float32, batch 8 (``--batch``), 112x112 (224 for the vision transformers): a training
  step (forward, sum, backward) and an inference forward (eval, no_grad), unpatched and patched
  timed in interleaved rounds after ``fastml.tune(model, x)`` (as the zoo benchmark: every layer
  decided, then the whole patched model timed against its unpatched self; ``--no-tune``: the
  per-layer measured choice alone) and six untimed calls of each. Each round swaps which of the
  two runs first (with the unpatched model always first, timm's models that tune left running as
  unpatched measured 0.97x to 0.99x; alternating, 0.99x to 1.02x). Ratios are the unpatched
  median over the patched one: above 1, fastml is faster. Then one training step of the tuned
  patched model against the original in float32 (``float32_check``), where oneDNN's kernels run.

``--source timm``: timm's models instead (``timm.create_model``, random weights), whose layers
are often torch's subclasses with forwards of their own (BatchNormAct2d, Conv2dSame,
ScaledStdConv2d), which fastml.patch leaves alone, and whose heads are sometimes convolutions
(VGG's ConvMlp). timm imports torchvision, so the same workaround applies; install it beside the
CPU torch without letting pip resolve torch again::

    pip install --no-deps timm huggingface_hub safetensors

Models with a fixed input size (timm's ``fixed_input_size``: ViT, DeiT, LeViT) run at it; the
others at 64 pixels for exactness and 128 for speed (HRNet and DLA take multiples of 32).

``--source transformers``: Hugging Face's image classifiers (``transformers``, each built from
its default configuration, random weights), called as ``model(pixel_values=x).logits``. Their
``forward`` branches on flags (``return_dict``, ``output_hidden_states``), so torch.fx cannot
trace them: with ``--fx``, fastml.patch folds only the runs inside an nn.Sequential there. Install it
beside the CPU torch as timm (``pip install --no-deps transformers tokenizers``, then its small
dependencies: regex, pyyaml, packaging, safetensors, tqdm, huggingface_hub and its httpx).

torchvision must match the installed torch (torchvision 0.28 for torch 2.13). Its wheel from
the package index is built for the CUDA torch: its C++ ops (nms, roi_align) fail to register
beside a CPU-only torch, and its import then fails. The models are pure Python and use none of
those ops, so this script lets the registrations fail and loads them anyway.

    python bench/torchvision_models.py [--source torchvision|timm|transformers] [--fx] [--batch 8] [--pixels N]
                                       [--rounds 7] [--skip-exactness | --skip-speed] [--no-tune] [model ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import fastml

DEFAULT = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0",
           "squeezenet1_1", "densenet121", "googlenet", "mnasnet1_0", "resnext50_32x4d", "convnext_tiny",
           "vgg11_bn", "alexnet", "inception_v3", "vit_b_32", "swin_t")
TIMM_DEFAULT = ("resnet50d", "seresnext26d_32x4d", "regnety_008", "tf_efficientnet_b0", "mobilenetv3_large_100",
                "mixnet_s", "ghostnet_100", "rexnet_100", "dla34", "dpn68", "cspdarknet53", "hrnet_w18_small",
                "res2net50_26w_4s", "vovnet39a", "convnext_atto", "nf_resnet26", "repvgg_a0", "xception41",
                "selecsls42b", "fastvit_t8", "mobileone_s0", "resnetv2_50", "poolformer_s12", "edgenext_xx_small",
                "lcnet_050", "tinynet_a", "vgg11_bn", "mobilenetv4_conv_small", "efficientvit_b0", "mobilevit_xxs",
                "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s")
HF_DEFAULT = ("ResNet", "ResNet-18", "RegNet", "ConvNext", "MobileNetV2", "MobileViT", "Swin", "ViT")
SLACK = 10.0
TRANSFORMERS = ("vit", "maxvit")


class Logits(torch.nn.Module):
    """A Hugging Face classifier as a function of its pixels to its logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


class Source:
    """Where the models come from: ``build(name)`` a model with 100 classes, ``pixels(name,
    purpose)`` the input's side for "exactness" (float64: small) or "speed"."""

    def __init__(self, name: str):
        self.name = name
        self.models = import_models()
        if name == "timm":
            import timm  # (after import_models: timm imports torchvision)
            self.timm = timm
        if name == "transformers":
            import transformers  # (after import_models, as timm)
            self.transformers = transformers

    def build(self, name: str) -> torch.nn.Module:
        if self.name == "timm":
            return self.timm.create_model(name, pretrained=False, num_classes=100)
        if self.name == "transformers":
            family, _, depth = name.partition("-")
            config = getattr(self.transformers, f"{family}Config")(num_labels=100)
            if depth:  # ResNet-18: the basic block at torchvision's widths
                config = self.transformers.ResNetConfig(num_labels=100, layer_type="basic", depths=[2, 2, 2, 2],
                                                        hidden_sizes=[64, 128, 256, 512])
            return Logits(getattr(self.transformers, f"{family}ForImageClassification")(config))
        extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        return getattr(self.models, name)(num_classes=100, **extra)

    def pixels(self, name: str, purpose: str) -> int:
        if self.name == "transformers":
            return 224 if name in ("ViT", "Swin") else 64 if purpose == "exactness" else 112
        if self.name == "timm":
            config = self.timm.models.get_pretrained_cfg(name)
            if config is not None and config.fixed_input_size:
                return config.input_size[-1]
            return 64 if purpose == "exactness" else 128
        if name.startswith(TRANSFORMERS):
            return 224  # (the vision transformers take 224 only)
        if purpose == "exactness":
            return 80 if name == "inception_v3" else 64  # (inception_v3 takes 75 or more)
        return 112


def import_models():
    """torchvision.models, importable even where torchvision's C++ ops cannot register."""
    register_fake = torch.library.register_fake

    def tolerant(*args, **kwargs):
        decorate = register_fake(*args, **kwargs)

        def apply(function):
            try:
                return decorate(function)
            except RuntimeError:  # "operator torchvision::nms does not exist": ops not loaded
                return function
        return apply

    torch.library.register_fake = tolerant
    try:
        import torchvision.models as models
    finally:
        torch.library.register_fake = register_fake
    return models


def _trace(model: torch.nn.Module, x: torch.Tensor, train: bool, seed: int) -> list[torch.Tensor]:
    """The output, the input's gradient and the parameters' gradients of one forward + backward."""
    model.train(train)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # stochastic depth (EfficientNet, ConvNeXt, Swin) drops the same samples in each
    out = model(x)
    # (drawn in float64 whatever the model's dtype: float32 draws other values from the same seed)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype))
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return [out.detach(), x.grad, *grads]


VANISHING = 1e-8
"""A gradient this many times smaller than the largest of its trace is zero but for rounding (the
bias of a batch norm whose output only feeds another batch norm: ShuffleNet's, 1e-14 against
1): its gap is measured against VANISHING x the largest norm instead of its own."""


def _gap(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest normwise relative difference between corresponding tensors."""
    assert len(got) == len(want), "not as many gradients"
    norms = [w.norm().item() for w in want]
    floor = VANISHING * max(norms)
    return max((g - w).norm().item() / max(n, floor, 1e-300) for g, w, n in zip(got, want, norms))


def exactness(source: Source, name: str, fx: bool) -> str:
    torch.manual_seed(0)
    original = source.build(name).double()
    for module in original.modules():
        # Dropout draws its mask in memory order, so the channels-last copy would drop other
        # elements than the original: no dropout here (fastml leaves dropout to torch).
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    patched = copy.deepcopy(original)
    report = fastml.patch(patched, fx=fx)
    torch_variant = copy.deepcopy(original).to(memory_format=torch.channels_last)
    pixels = source.pixels(name, "exactness")  # small images, to keep float64 quick
    x = torch.randn(2, 3, pixels, pixels, dtype=torch.float64)
    fastml_gap = torch_gap = 0.0
    for seed, train in enumerate((True, False, True)):
        want = _trace(original, x, train, seed)
        fastml_gap = max(fastml_gap, _gap(_trace(patched, x, train, seed), want))
        torch_gap = max(torch_gap, _gap(_trace(torch_variant, x, train, seed), want))
    state, patched_state = original.state_dict(), patched.state_dict()
    if state.keys() != patched_state.keys():
        return f"FAIL state_dict keys differ ({len(report.replaced)} replaced)"
    for key, value in state.items():
        if not value.is_floating_point() and not torch.equal(value, patched_state[key]):
            return f"FAIL {key}: {patched_state[key]} against {value}"
    floating = [key for key, value in state.items() if value.is_floating_point()]
    variant_state = torch_variant.state_dict()
    fastml_gap = max(fastml_gap, _gap([patched_state[k] for k in floating], [state[k] for k in floating]))
    torch_gap = max(torch_gap, _gap([variant_state[k] for k in floating], [state[k] for k in floating]))
    verdict = "ok" if fastml_gap <= max(SLACK * torch_gap, 1e-12) else "FAIL"
    return f"{verdict} gap {fastml_gap:.1e} (torch's own {torch_gap:.1e})"


def speed(source: Source, name: str, fx: bool, batch: int, rounds: int, tune: bool,
          pixels: int | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    original = source.build(name)
    patched = copy.deepcopy(original)
    fastml.patch(patched, fx=fx)
    pixels = pixels or source.pixels(name, "speed")
    x = torch.randn(batch, 3, pixels, pixels)
    ratios = {}
    for mode in ("train", "infer"):
        def step(model):
            if mode == "train":
                model.train()
                model(x).sum().backward()
            else:
                model.eval()
                with torch.no_grad():
                    model(x)
        if tune:  # as the zoo benchmark: layers decided, then the whole model against unpatched
            patched.train(mode == "train")
            with torch.set_grad_enabled(mode == "train"):
                fastml.tune(patched, x)
        for model in (original, patched):
            for _ in range(6):
                step(model)
        times: dict[int, list[float]] = {0: [], 1: []}
        for turn in range(rounds):
            for i in (0, 1) if turn % 2 == 0 else (1, 0):
                model = (original, patched)[i]
                start = time.perf_counter()
                step(model)
                times[i].append(time.perf_counter() - start)
        ratios[mode] = statistics.median(times[0]) / statistics.median(times[1])
        ratios[mode + " ms"] = statistics.median(times[0]) * 1e3
        if mode == "train":  # (before the inference tune sets the model up for inference)
            ratios["float32"] = float32_check(original, patched, x)
    return ratios


def float32_check(original: torch.nn.Module, patched: torch.nn.Module, x: torch.Tensor) -> str:
    """The tuned patched model in float32, as the speed run computes, against the original in
    float64: the output and every gradient of one training step, normwise, beside the original's
    own float32 gap. The float64 exactness check never reaches oneDNN, whose kernels run only
    float32 (and lower) here: a fault of theirs on a layout fastml chose (a strided 1x1
    convolution's weight gradient on channels-last memory, oneDNN issue 6035, wrong rather than
    crashing on some CPUs) shows only here."""
    for model in (original, patched):
        model.zero_grad(set_to_none=True)  # (the timed steps' gradients accumulated)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0  # (as in ``exactness``)
    reference = copy.deepcopy(original).double()
    want = _trace(reference, x.double(), True, 0)
    gap = _gap([t.double() for t in _trace(patched, x, True, 0)], want)
    own = _gap([t.double() for t in _trace(original, x, True, 0)], want)
    verdict = "ok" if gap <= SLACK * own else "FAIL"
    return f"float32 {verdict} gap {gap:.1e} (torch's own {own:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: a list of each source's)")
    parser.add_argument("--source", choices=("torchvision", "timm", "transformers"), default="torchvision")
    parser.add_argument("--fx", action="store_true", help="fastml.patch(model, fx=True)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pixels", type=int, help="the speed run's image side (default: the source's for each model)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--no-tune", action="store_true",
                        help="time without fastml.tune(model, x) first (the measured choice per layer only)")
    args = parser.parse_args()
    source = Source(args.source)
    names = args.models or {"timm": TIMM_DEFAULT, "transformers": HF_DEFAULT}.get(args.source, DEFAULT)
    version = sys.modules[args.source].__version__
    print(f"# {args.source} ({version}), torch {torch.__version__}, fastml.patch(fx={args.fx}), fastml.tune: {not args.no_tune}, "
          f"batch {args.batch}, {args.pixels or 'default'} pixels, {args.rounds} rounds; "
          "ratios: unpatched median / patched median (above 1: fastml faster)")
    train, infer = [], []
    for name in names:
        check = "" if args.skip_exactness else exactness(source, name, args.fx)
        if args.skip_speed:
            print(f"{name:28s} {check}", flush=True)
            continue
        r = speed(source, name, args.fx, args.batch, args.rounds, not args.no_tune, args.pixels)
        train.append(r["train"])
        infer.append(r["infer"])
        print(f"{name:28s} train {r['train']:.3f}x (torch {r['train ms']:7.1f} ms)  infer {r['infer']:.3f}x "
              f"(torch {r['infer ms']:6.1f} ms)  {r['float32']}  {check}", flush=True)
    if train:
        print(f"geometric mean: train {statistics.geometric_mean(train):.3f}x, infer {statistics.geometric_mean(infer):.3f}x")


if __name__ == "__main__":
    main()
