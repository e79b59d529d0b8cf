"""Loading the model and its processor: the model card's code (`AutoProcessor`,
`AutoModelForImageTextToText.from_pretrained` on a hub id or a local path) with the job's device, dtype,
attention and quantization options; what a replica generates with (`load_for_generation`: the model on
its device, its processor, the tokens that end an answer); and the driver's one-time check that a
checkpoint is usable. Also which GPUs there are: the cluster's, for the driver's placement, and the one
Ray gave a replica."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch

from scriptorium.core.errors import SpecError
from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.spec import ModelSpec
from scriptorium.pipeline.family import FAMILIES, family_named, supported_families_line
from scriptorium.pipeline.model.journal import ray_context

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
END_OF_UTTERANCE = "<end_of_utterance>"  # how an instruct checkpoint's answers end


class LoadedModel(NamedTuple):
    """What a model replica generates with."""

    model: object  # the checkpoint, on `device`, in eval mode
    processor: object  # its processor, at the job's image settings
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    eos_ids: frozenset[int]  # the token ids that end an answer (`end_of_answer_ids`)


def load_for_generation(spec: ModelSpec, image_settings: ImageSettings) -> LoadedModel:
    """The model of `spec` on this replica's device with its processor, checked to agree with each other."""
    device = resolve_device(spec.device)
    processor = load_processor(spec.id, image_settings)
    model = load_model(spec, device)
    check_image_tokens(processor, model)
    return LoadedModel(model, processor, device, resolve_dtype(spec.dtype, device),
                       end_of_answer_ids(model, processor.tokenizer))


def end_of_answer_ids(model, tokenizer) -> frozenset[int]:
    """The generation config's end-of-sequence ids and `<end_of_utterance>`. Instruct answers end with the
    latter, and a checkpoint's generation config may list only `</s>`: without it every answer would run
    on to max_new_tokens."""
    configured = model.generation_config.eos_token_id  # None, an id or a list of ids
    ids = set(configured) if isinstance(configured, (list, tuple)) else {configured} - {None}
    end_of_utterance = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    if isinstance(end_of_utterance, int) and end_of_utterance != tokenizer.unk_token_id:
        ids.add(end_of_utterance)
    return frozenset(ids)


def check_image_tokens(processor, model) -> None:
    """The processor expands each `<image>` into `image_seq_len` tokens per crop, and the model's connector
    gives each crop its number of rows (pipeline/family.py): a checkpoint whose two configs disagree would
    misplace every image feature."""
    family = family_named(model.config.model_type)
    per_crop = family.image_tokens_per_crop(model.config)
    if processor.image_seq_len != per_crop:
        raise ValueError(f"processor image_seq_len={processor.image_seq_len} != {per_crop} image tokens a crop "
                         f"takes in the {model.config.model_type} model")
    edge = family.crop_edge(model.config)
    if edge is not None and processor.image_processor.max_image_size["longest_edge"] != edge:
        raise ValueError(f"processor tiles of {processor.image_processor.max_image_size['longest_edge']} px != "
                         f"the {edge} px the {model.config.model_type} vision tower takes")


def resolve_device(requested: str) -> str:
    """The device this replica loads the model onto. In a Ray actor, a GPU only if Ray assigned it one:
    Ray (2.60 on) leaves every GPU of the node visible to an actor that asked for none, where CUDA would
    find GPU 0, which Ray may have given another replica. A job's replicas are told "cuda" or "cpu" (the
    driver decides "auto", pipeline/stages.py); "auto" here is a step built outside a job."""
    gpus = gpus_assigned_by_ray()  # None outside a Ray actor
    if gpus is not None and not gpus:
        if requested == "cuda":
            raise RuntimeError("device \"cuda\" was requested but Ray assigned this replica no GPU (num_gpus = 0): "
                               "set resources.gpus_per_replica > 0 so Ray reserves one, or device = \"cpu\"")
        hide_gpus()
        return "cpu"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but this worker has no CUDA GPU")
    return requested


def gpus_assigned_by_ray() -> list[str] | None:
    """The ids of the GPUs Ray assigned the actor this code runs in ([] for none); None outside an actor."""
    context = ray_context()
    if context is None or not context.get_actor_id():
        return None
    return list(context.get_accelerator_ids().get("GPU", []))


def hide_gpus() -> None:
    """Make this process's GPUs invisible to CUDA, which reads the variable when first used: nothing in a
    replica Ray gave no GPU (torch, a library probing for one) can then take memory on one."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def gpus_in_cluster() -> float:
    """The GPUs a job's replicas can be placed on: the Ray cluster's when this driver has joined one; else
    this machine's (the in-process runner runs the model here, and Ray Data starts its Ray here)."""
    if ray_context() is None:
        return float(torch.cuda.device_count())
    import ray  # where Ray runs: the model stage also runs on machines without it

    return float(ray.cluster_resources().get("GPU", 0))


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return TORCH_DTYPES[requested]


def load_processor(model_id: str, image_settings: ImageSettings | None = None):
    """The checkpoint's processor on the PIL backend (CPU and GPU nodes preprocess identically).

    Image splitting is set on the image processor itself, not per call: the text expansion of
    `<image>` (64 vs 5x64 tokens) reads that attribute, so a per-call flag would desynchronise them.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id, backend="pil")
    if image_settings is not None:
        ip = processor.image_processor
        ip.do_image_splitting = image_settings.do_image_splitting
        ip.size = ({"longest_edge": image_settings.longest_edge} if image_settings.idefics3_rule else
                   {"longest_edge": image_settings.longest_edge, "shortest_edge": image_settings.shortest_edge})
    return processor


def load_model(spec: ModelSpec, device: str):
    from transformers import AutoModelForImageTextToText

    dtype = resolve_dtype(spec.dtype, device)
    kwargs = {
        "dtype": dtype,
        "attn_implementation": spec.attn_implementation,
        # Weights load straight onto the replica's device (its GPU is device 0 inside a Ray actor), not
        # through a host copy: 16 GB of bf16 per replica would otherwise sit in host memory while loading.
        "device_map": {"": 0 if device == "cuda" else device},
    }
    if spec.quantization == "bnb-4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    # AWQ checkpoints carry their quantization_config; from_pretrained applies it by itself.
    model = AutoModelForImageTextToText.from_pretrained(spec.id, **kwargs)
    model.eval()
    return model


def check_family(model_id: str) -> None:
    """A checkpoint of another architecture stops the job here, in one line, not on a replica later. A
    config that cannot be read is left to the processor's load, which says why."""
    from transformers import AutoConfig

    try:
        family = AutoConfig.from_pretrained(model_id).model_type
    except Exception:
        return
    if family not in FAMILIES:
        raise SpecError(f"model {model_id} is a checkpoint of model type {family}: Scriptorium runs these "
                        f"families: {supported_families_line()}")


def open_model_config(model: ModelSpec) -> tuple[object, ImageSettings]:
    """Load the checkpoint's processor in the driver: fails fast on a missing model, gives image settings."""
    model_id = model.id
    # A hub id is "org/name"; anything else that is not an existing directory is a missing local path.
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) is not None and not model_id.startswith(".")
    if not os.path.isdir(os.path.expanduser(model_id)) and not is_hub_id:
        raise SpecError(f"model path {model_id} does not exist: build one with `scriptorium tiny-model DIR` "
                        "or pass a hub id such as HuggingFaceM4/idefics2-8b")
    check_family(model_id)
    try:
        processor = load_processor(model_id)
    except Exception as exc:
        raise SpecError(
            f"cannot load model {model_id!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
            "Pass a local checkpoint directory, or a hub id with network access (unset HF_HUB_OFFLINE)"
        ) from None
    overrides = {
        "do_image_splitting": model.do_image_splitting,
        "longest_edge": model.longest_edge,
        "shortest_edge": model.shortest_edge,
    }
    return processor, ImageSettings.from_processor(processor, overrides)
