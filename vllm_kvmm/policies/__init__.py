"""KV-compression policies (pure torch, no vLLM import). See :mod:`vllm_kvmm.policies.base`."""

from vllm_kvmm.policies.base import (
    BUDGET_TOLERANCE,
    KVPolicy,
    LayerPlan,
    MergeSpec,
    PromptInfo,
    apply_plan,
    block_tail_start,
    budget_tokens,
    layout,
    plan_compression,
)
from vllm_kvmm.policies.decode import DecodeSpec, FlushPlan, StoredSlots, flush_tail_start, plan_flush
from vllm_kvmm.policies.full import Full
from vllm_kvmm.policies.h2o import H2O
from vllm_kvmm.policies.hae import HAE, BinEvent, RecycleBin
from vllm_kvmm.policies.lookm import LookM
from vllm_kvmm.policies.meda import MEDA, MEDAPaper, MEDAReleased
from vllm_kvmm.policies.parts import DecodeCadence, Merging, SampledScores, Sinks
from vllm_kvmm.policies.pyramidkv import PyramidKV
from vllm_kvmm.policies.registry import POLICIES, PolicyError, make_policy, policy_names
from vllm_kvmm.policies.snapkv import SnapKV
from vllm_kvmm.policies.streaming import StreamingLLM

__all__ = [
    "BUDGET_TOLERANCE",
    "H2O",
    "HAE",
    "MEDA",
    "POLICIES",
    "BinEvent",
    "DecodeCadence",
    "DecodeSpec",
    "FlushPlan",
    "Full",
    "KVPolicy",
    "LayerPlan",
    "LookM",
    "MEDAPaper",
    "MEDAReleased",
    "MergeSpec",
    "Merging",
    "PolicyError",
    "PromptInfo",
    "PyramidKV",
    "RecycleBin",
    "SampledScores",
    "Sinks",
    "SnapKV",
    "StoredSlots",
    "StreamingLLM",
    "apply_plan",
    "block_tail_start",
    "budget_tokens",
    "flush_tail_start",
    "layout",
    "make_policy",
    "plan_compression",
    "plan_flush",
    "policy_names",
]
