"""ModelRunner against transformers: greedy tokens equal `generate` exactly, in every batch shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._tiny_llama import Driver, hf_greedy, make_tiny_llama
from workers.engine.linear import onednn_available
from workers.engine.model_runner import ModelRunner
from workers.engine.sampler import Sampler
from workers.engine.sequence import SamplingParams

pytestmark = pytest.mark.unit

GEMMS = ["blas", *(["onednn"] if onednn_available() else [])]

PROMPTS = [
    [5, 17, 33, 250, 7, 99, 100, 3, 42],
    [11],
    [8, 9, 10, 11, 12],
    list(range(20, 60)),
    [201, 202, 7, 7, 7, 19, 44, 1, 3, 250, 251, 252, 13, 14, 15, 16, 17],
    [3, 141, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 2, 88, 41, 97, 16, 93, 99],
    [(i * 37) % 290 + 5 for i in range(64)],
    [150, 151, 152],
]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    path = tmp_path_factory.mktemp("tiny_llama")
    return make_tiny_llama(path, tie_word_embeddings=request.param), path


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    path = tmp_path_factory.mktemp("tiny_llama_tied")
    return make_tiny_llama(path, tie_word_embeddings=True), path


def make_runner(path: Path, block_size: int = 4, gemm: str = "auto") -> ModelRunner:
    return ModelRunner(path, num_blocks=512, block_size=block_size, gemm=gemm)  # type: ignore[arg-type]


def test_spec_and_pool_layout(tied) -> None:
    _, path = tied
    runner = make_runner(path, block_size=16)
    spec = runner.spec
    assert (spec.vocab_size, spec.max_model_len, spec.eos_token_ids) == (300, 512, [2])
    layout = spec.layout
    assert (layout.dtype, layout.num_layers, layout.num_kv_heads, layout.head_dim) == ("float32", 2, 2, 16)
    assert runner.kv_pool.shape == (512, 2, 2, 16, 2, 16)
    assert runner.kv_pool.is_contiguous()
    assert runner.kv_pool[3].numel() * runner.kv_pool.element_size() == layout.block_bytes


def test_unknown_gemm_fails_at_construction(tied) -> None:
    with pytest.raises(ValueError, match="unknown gemm 'fastest'"):
        ModelRunner(tied[1], num_blocks=8, gemm="fastest")  # type: ignore[arg-type]


def test_default_num_blocks_from_kv_cache_bytes(tied) -> None:
    _, path = tied
    runner = ModelRunner(path, block_size=16, kv_cache_bytes=10 * 65536 + 5)
    assert runner.spec.layout.block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    assert runner.num_blocks == (10 * 65536 + 5) // runner.spec.layout.block_bytes


def test_default_cpu_pool_holds_two_full_context_sequences(default_model_dir: Path) -> None:
    """The default pool must never refuse a prompt the model accepts (it once held 5,824 tokens of
    SmolLM2's 8,192)."""
    runner = ModelRunner(default_model_dir)  # NOTE: sizes the pool; loads nothing
    assert runner.num_blocks * runner.block_size >= 2 * runner.spec.max_model_len


def test_greedy_matches_hf_batch1(tiny) -> None:
    model, path = tiny
    driver = Driver(make_runner(path))
    got = driver.generate([driver.new_seq("a", PROMPTS[0])], 24)[0]
    assert got == hf_greedy(model, PROMPTS[0], 24)


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
        {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4, "head_dim": 32},
    ],
    ids=["llama3_rope", "linear_rope", "bias_mha_head_dim"],
)
def test_config_variants_match_hf(tmp_path: Path, overrides: dict) -> None:
    model = make_tiny_llama(tmp_path, **overrides)
    if overrides.get("attention_bias"):
        with torch.no_grad():  # NOTE: random init leaves biases at zero; make them count
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
        model.save_pretrained(tmp_path)
    driver = Driver(make_runner(tmp_path))
    seqs = [driver.new_seq(f"r{i}", p) for i, p in enumerate(PROMPTS[3:7])]
    got = driver.generate(seqs, 12, chunk=16)
    for prompt, tokens in zip(PROMPTS[3:7], got, strict=True):
        assert tokens == hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("chunk", [None, 8])
def test_greedy_matches_hf_batch8_mixed(tied, chunk: int | None, gemm: str) -> None:
    """All 8 step together: with chunk=8 long prompts still prefill while short ones decode."""
    model, path = tied
    driver = Driver(make_runner(path, gemm=gemm))
    seqs = [driver.new_seq(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    got = driver.generate(seqs, 16, chunk=chunk)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == hf_greedy(model, prompt, 16)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_prefill_matches(tied, chunk: int) -> None:
    model, path = tied
    driver = Driver(make_runner(path))
    prompt = PROMPTS[3]
    got = driver.generate([driver.new_seq("a", prompt)], 12, chunk=chunk)[0]
    assert got == hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("prompt_len", [21, 22, 27])
def test_second_seq_reuses_cached_prefix_blocks(tied, prompt_len: int) -> None:
    """B starts at A's full prompt blocks (start = cached length), as after a prefix-cache hit."""
    model, path = tied
    runner = make_runner(path)
    driver = Driver(runner)
    prompt = PROMPTS[6][:prompt_len]
    a = driver.new_seq("a", prompt)
    expected = driver.generate([a], 10)[0]
    assert expected == hf_greedy(model, prompt, 10)
    full = prompt_len // runner.block_size
    b = driver.new_seq("b", prompt)
    b.block_table = a.block_table[:full]
    b.num_computed_tokens = b.num_cached_tokens = full * runner.block_size
    assert driver.generate([b], 10)[0] == expected
    # a different continuation of the same cached blocks
    other = [*prompt[: full * runner.block_size], 77, 78, 79]
    c = driver.new_seq("c", other)
    c.block_table = a.block_table[:full]
    c.num_computed_tokens = full * runner.block_size
    assert driver.generate([c], 10)[0] == hf_greedy(model, other, 10)


def test_kv_pool_holds_hf_keys_and_values(tied) -> None:
    model, path = tied
    runner = make_runner(path)
    driver = Driver(runner)
    prompt = PROMPTS[3][:10]
    seq = driver.new_seq("a", prompt)
    driver.step([seq])
    with torch.inference_mode():
        cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
    bs = runner.block_size
    for layer in range(2):
        for kv, hf in ((0, cache.layers[layer].keys[0]), (1, cache.layers[layer].values[0])):
            ours = torch.cat([runner.kv_pool[b, layer, kv] for b in seq.block_table])[: len(prompt)]
            assert seq.block_table and len(seq.block_table) == -(-len(prompt) // bs)
            torch.testing.assert_close(ours.transpose(0, 1), hf, atol=1e-5, rtol=1e-5)


def test_logprobs_match_hf_log_softmax(tied) -> None:
    model, path = tied
    driver = Driver(make_runner(path))
    prompt = PROMPTS[5]
    seq = driver.new_seq("a", prompt, SamplingParams(temperature=0.0, logprobs=5))
    tok = driver.step([seq])[0]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
    best = ref.topk(5)
    assert tok is not None and tok.token_id == int(best.indices[0])
    assert tok.logprob == pytest.approx(float(best.values[0]), abs=1e-4)
    assert tok.top_logprobs is not None
    assert [t for t, _ in tok.top_logprobs] == best.indices.tolist()
    assert [lp for _, lp in tok.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_logprobs_zero_gives_chosen_only(tied) -> None:
    _, path = tied
    driver = Driver(make_runner(path))
    seq = driver.new_seq("a", PROMPTS[0], SamplingParams(temperature=0.7, seed=1, logprobs=0))
    tok = driver.step([seq])[0]
    assert tok is not None and tok.logprob is not None and tok.logprob <= 0.0
    assert tok.top_logprobs is None


def test_seeded_sampling_reproducible_whatever_the_batch(tied) -> None:
    _, path = tied
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    d1 = Driver(make_runner(path))
    alone = d1.generate([d1.new_seq("x", PROMPTS[0], params)], 16)[0]
    d2 = Driver(make_runner(path))
    seqs = [d2.new_seq(f"o{i}", p, SamplingParams(temperature=1.0)) for i, p in enumerate(PROMPTS[1:4])]
    seqs.insert(1, d2.new_seq("x", PROMPTS[0], params))
    assert d2.generate(seqs, 16, chunk=4)[1] == alone
    d3 = Driver(make_runner(path))
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321)
    assert d3.generate([d3.new_seq("x", PROMPTS[0], other_seed)], 16)[0] != alone


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1, seed=3),
        SamplingParams(temperature=1.5, top_p=1e-9, seed=3),
        SamplingParams(temperature=0.0, top_k=50, top_p=0.5),
    ],
    ids=["top_k=1", "tiny_top_p", "temperature=0"],
)
def test_degenerate_sampling_is_greedy(tied, params: SamplingParams) -> None:
    model, path = tied
    driver = Driver(make_runner(path))
    got = driver.generate([driver.new_seq("a", PROMPTS[4], params)], 12)[0]
    assert got == hf_greedy(model, PROMPTS[4], 12)


# -- sampler alone -----------------------------------------------------------------------------

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * 4]))


def draws(params: SamplingParams, n: int = 300, rid: str = "r") -> set[int]:
    sampler = Sampler()
    return {sampler.sample(LOGITS, [rid], [params])[0].token_id for _ in range(n)}


def test_sampler_top_k_and_top_p_limit_the_candidates() -> None:
    assert draws(SamplingParams(top_k=3, seed=0)) == {0, 1, 2}
    assert draws(SamplingParams(top_p=0.7, seed=0)) == {0, 1}
    assert draws(SamplingParams(top_p=0.45, seed=0)) == {0}
    assert draws(SamplingParams(top_k=3, top_p=0.9, seed=0)) == {0, 1, 2}


def test_sampler_seed_restarts_after_free_and_unseeded_uses_global_rng() -> None:
    sampler = Sampler()
    params = SamplingParams(temperature=5.0, seed=7)
    first = [sampler.sample(LOGITS, ["r"], [params])[0].token_id for _ in range(20)]
    sampler.free("r")
    again = [sampler.sample(LOGITS, ["r"], [params])[0].token_id for _ in range(20)]
    assert first == again
    unseeded = SamplingParams(temperature=5.0)
    torch.manual_seed(11)
    a = [sampler.sample(LOGITS, ["u"], [unseeded])[0].token_id for _ in range(20)]
    torch.manual_seed(11)
    b = [sampler.sample(LOGITS, ["u"], [unseeded])[0].token_id for _ in range(20)]
    assert a == b


# -- the real default model --------------------------------------------------------------------


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def smol(default_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir), default_model_dir


@pytest.mark.e2e
def test_default_model_greedy_matches_hf(smol) -> None:
    model, tokenizer, path = smol
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    driver = Driver(ModelRunner(path, num_blocks=64))
    got = driver.generate([driver.new_seq("a", prompt)], 24)[0]
    assert got == hf_greedy(model, prompt, 24)
    assert "Paris" in tokenizer.decode(got)


QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "List the planets of the solar system in order from the sun, please.",
]


@pytest.mark.e2e
@pytest.mark.parametrize("gemm", GEMMS)
def test_default_model_batch8_matches_hf(smol, gemm: str) -> None:
    model, tokenizer, path = smol
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    driver = Driver(ModelRunner(path, num_blocks=128, gemm=gemm))  # type: ignore[arg-type]
    got = driver.generate([driver.new_seq(f"r{i}", p) for i, p in enumerate(prompts)], 24, chunk=32)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(model, prompt, 24)


@pytest.mark.gpu
@pytest.mark.e2e
def test_default_model_on_cuda_matches_hf_on_cuda(default_model_dir: Path) -> None:
    """Same code path on a GPU (float32 on both sides, so greedy output must match exactly)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval().cuda()
    prompts = [chat_ids(tokenizer, q) for q in ("What is the capital of France?", "Name three colors.")]
    driver = Driver(ModelRunner(default_model_dir, num_blocks=64, device="cuda", dtype="float32"))
    got = driver.generate([driver.new_seq(f"g{i}", p) for i, p in enumerate(prompts)], 16)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(model, prompt, 16)


NEAR_TIE = 0.5  # bf16 logits of this model move by up to ~0.25 between kernels


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize("batch", [1, 8])
def test_default_model_on_cuda_bf16_matches_hf_bf16(default_model_dir: Path, batch: int) -> None:
    """bf16 on both sides, as GPUs serve: greedy tokens equal transformers', except that where the
    reference's top two logits are within NEAR_TIE the two may branch (asserted, not assumed)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).eval().cuda()
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:batch]]
    driver = Driver(ModelRunner(default_model_dir, num_blocks=128, device="cuda", dtype="bfloat16"))
    got = driver.generate([driver.new_seq(f"b{i}", p) for i, p in enumerate(prompts)], 24, chunk=32)
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt], device="cuda"), max_new_tokens=24, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        want = out.sequences[0, len(prompt) :].tolist()
        same = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), min(len(tokens), len(want)))
        if same < min(len(tokens), len(want)):
            top2 = out.scores[same][0].float().topk(2).values
            assert top2[0] - top2[1] < NEAR_TIE, (
                f"diverged at token {same} without a near-tie: {tokens} vs {want}"
            )
