"""Model lists and model-side helpers for the zoo tests (``tests/test_zoo.py``).

Everything here is independent of :mod:`convnorm_fx`: the expected conv sites of a model
are counted from its module classes only, so the tests compare the library's report with
a second opinion instead of with itself.

Every model is built with random weights (``weights=None`` / ``pretrained=False``); no
weights are ever downloaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torchvision
from torch import nn

# --------------------------------------------------------------------------------------
# Model lists
# --------------------------------------------------------------------------------------

#: The fast subset, run in the default suite (each one also runs in the full sweep).
FAST_MODELS = [
    "tv-resnet18",  # plain convs, BN after every conv
    "tv-mobilenet_v3_small",  # depthwise convs, SqueezeExcitation convs with bias, no norm after them
    "timm-resnetv2_50x1_bit",  # StdConv2d: weight standardization, rewritten in the graph
    "timm-tf_mobilenetv3_small_minimal_100",  # Conv2dSame: dynamic TF "same" padding
    "timm-resnetblur18",  # BlurPool2d: functional convs on a fixed buffer, must be skipped
    "timm-nf_regnet_b0",  # ScaledStdConv2d inside NormFreeBlock (a timm leaf that hides convs)
]

#: torchvision models too large for the 2-core sweep budget: the family is covered by a
#: smaller variant of the same architecture (same conv classes, same code paths). They run
#: when CONVNORM_ZOO_HUGE=1 is set.
TV_HUGE = {
    "regnet_y_128gf": "644M parameters (several GB per copy; the test holds ~4 copies); regnet_y_* covered",
    "regnet_y_32gf": "145M parameters, slow to build and copy; regnet_y_* covered by smaller variants",
    "regnet_x_32gf": "107M parameters, slow to build and copy; regnet_x_* covered by smaller variants",
    "vit_h_14": "632M parameters and a fixed 224 input; vit_b_16/vit_b_32 cover the same code",
    "vit_l_16": "304M parameters and a fixed 224 input; vit_b_16 covers the same code",
    "vit_l_32": "306M parameters and a fixed 224 input; vit_b_32 covers the same code",
}

#: torchvision: every classification model (``list_models(module=torchvision.models)``),
#: the huge ones above behind CONVNORM_ZOO_HUGE.
TV_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))

#: timm: the smallest variant of each family, with what each one exercises.
TIMM_MODELS = [
    "resnet10t",  # resnet, deep stem
    "resnetv2_50x1_bit",  # resnetv2: StdConv2d (weight standardization in forward)
    "resnest14d",  # split attention, grouped convs
    "res2net50_48w_2s",  # res2net: hierarchical splits
    "skresnet18",  # selective kernel: dilated convs
    "regnetx_002",  # regnet
    "efficientnet_b0",  # efficientnet: depthwise, SE convs
    "tf_efficientnet_b0",  # Conv2dSame (dynamic TF "same" padding)
    "efficientnet_cc_b0_4e",  # CondConv2d: per-sample expert kernels, each sample normalized on its own
    "mobilenetv3_small_050",  # mobilenetv3
    "tf_mobilenetv3_small_minimal_100",  # Conv2dSame in a mobilenet
    "mixnet_s",  # MixedConv2d (several kernel sizes over channel splits)
    "ghostnet_050",  # ghost modules (cheap depthwise convs)
    "rexnet_100",  # rexnet
    "densenet121",  # densenet: concatenations
    "dpn48b",  # dual path network
    "dla46_c",  # deep layer aggregation
    "hrnet_w18_small",  # multi-resolution branches, fuse layers
    "cs3darknet_focus_s",  # cspnet
    "darknet17",  # darknet
    "vgg11",  # ConvMlp head (a timm leaf the census found untraceable): module-swap fallback
    "xception41p",  # aligned xception (pre-activation)
    "nf_regnet_b0",  # nfnet family: ScaledStdConv2d, NormFreeBlock leaves
    "nf_resnet26",  # nfnet family: ScaledStdConv2d in a resnet
    "dm_nfnet_f0",  # ScaledStdConv2dSame: weight standardization + dynamic padding
    "ecaresnet26t",  # ECA attention: Conv1d, reported 'not rewritten'
    "repvgg_a0",  # RepVGG (train-time branches)
    "convnext_atto",  # convnext: 7x7 depthwise convs followed by LayerNorm
    "resnetblur18",  # BlurPool2d: buffer convs, must be skipped
    "coatnet_pico_rw_224",  # hybrid conv-transformer (MBConv + attention), fixed 224 input
    # From the census's untraceable list: exercise tracing in parts and the module swap.
    "mobilevit_xxs",  # MobileVitBlock: data-dependent forward
    "efficientvit_b0",  # LiteMLA: data-dependent forward
    "tiny_vit_5m_224",  # TinyVitBlock: data-dependent forward
]

#: Constructor arguments that keep a model small without changing the code it exercises.
TIMM_KWARGS: dict[str, dict[str, Any]] = {
    # ConvMlp at 1/8 width: by default its 7x7 fc1 alone has 103M parameters (4096x512x7x7),
    # which made this one model take minutes; mlp_ratio keeps the same untraceable ConvMlp.
    "vgg11": {"mlp_ratio": 0.125},
}

#: Models on which a check fails because of a bug in the library (not in the test). Each
#: entry is marked ``xfail(strict=True)``: remove it once the bug is fixed. Keys are test ids.
KNOWN_LIBRARY_BUGS: dict[str, str] = {
}

# --------------------------------------------------------------------------------------
# Building models and picking an input size
# --------------------------------------------------------------------------------------


def build(model_id: str) -> nn.Module:
    """Build ``'tv-<name>'`` or ``'timm-<name>'`` with random weights, in eval mode."""
    source, _, name = model_id.partition("-")
    torch.manual_seed(0)
    if source == "tv":
        model = torchvision.models.get_model(name, weights=None)
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **TIMM_KWARGS.get(name, {}))
    else:
        raise ValueError(f"unknown model source in {model_id!r}")
    return model.eval()


def _candidate_sizes(model: nn.Module) -> list[int]:
    sizes = [64, 96, 128]
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("input_size"):
        sizes.append(int(cfg["input_size"][-1]))
    sizes += [224, 299]  # 299: Inception v3's auxiliary head (train mode) needs its full size
    return list(dict.fromkeys(sizes))


def pick_input_size(model: nn.Module, batch: int = 2) -> int:
    """The smallest square input the original model accepts, in eval and train mode.

    The train-mode probe updates BatchNorm running statistics; that is harmless because the
    model is only copied (by ``apply``) afterwards.
    """
    errors = []
    for size in _candidate_sizes(model):
        try:
            # Both modes: some branches run only in training (Inception's auxiliary head).
            for train in (False, True):
                model.train(train)
                with torch.no_grad():
                    model(torch.zeros(batch, 3, size, size))
        except Exception as e:  # noqa: BLE001 - any failure means "try a larger input"
            errors.append(f"{size}: {type(e).__name__}: {e}")
            continue
        finally:
            model.eval()
        return size
    raise AssertionError("the original model accepts none of the candidate sizes:\n" + "\n".join(errors))


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (tensor, tuple/namedtuple, list or dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


# --------------------------------------------------------------------------------------
# The independent count of conv sites
# --------------------------------------------------------------------------------------

#: Convolutions the library leaves out of scope (reported ``'not rewritten'``).
OUT_OF_SCOPE_CLASSES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: Modules that are not ``nn.Conv2d`` but whose own forward calls ``F.conv2d`` once, on a
#: weight that is not a learned kernel of theirs, with a word the skip reason must contain.
#: (Checked against timm 1.0.31's sources: BlurPool2d convolves with its ``filt`` buffer.)
NON_LEARNED_CONV_OWNERS = {
    "BlurPool2d": "buffer",
}

#: Learned convs that are not ``nn.Conv2d``, with a word the rewrite reason must contain.
#: (timm 1.0.31: CondConv2d keeps ``E`` expert kernels as one ``(E, C_out * C_in/g * k * k)``
#: Parameter and convolves each sample with its routing-weighted mix; it is one site and
#: must be rewritten, each sample's mixed kernel normalized on its own.)
PER_SAMPLE_CONV_CLASSES = {
    "CondConv2d": "per-sample CondConv",
}


@dataclasses.dataclass(frozen=True)
class ExpectedSite:
    fqn: str
    conv_class: str
    category: str  # 'learned' (must be rewritten), 'out_of_scope' (1-D/3-D/transposed), 'non_learned'


def expected_sites(model: nn.Module) -> dict[str, ExpectedSite]:
    """Every conv site of ``model`` by qualified name, from module classes alone."""
    sites = {}
    for fqn, module in model.named_modules():
        name = type(module).__name__
        if isinstance(module, nn.Conv2d):  # any subclass: StdConv2d, Conv2dSame, ...
            sites[fqn] = ExpectedSite(fqn, name, "learned")
        elif isinstance(module, OUT_OF_SCOPE_CLASSES):
            sites[fqn] = ExpectedSite(fqn, name, "out_of_scope")
        elif name in PER_SAMPLE_CONV_CLASSES:
            sites[fqn] = ExpectedSite(fqn, name, "learned")
        elif name in NON_LEARNED_CONV_OWNERS:
            sites[fqn] = ExpectedSite(fqn, name, "non_learned")
    return sites
