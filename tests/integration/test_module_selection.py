"""Choosing what to quantize: modules_to_not_convert / modules_override keys at any depth (a
block keeps everything under it), ``re:`` patterns, the default float modules of multimodal
models and tied output heads, and save + reload of each on tiny random models."""
import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskedLM,
                          AutoModelForSeq2SeqLM, BertConfig, BertForMaskedLM, CLIPVisionConfig, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, T5Config,
                          T5ForConditionalGeneration)

import hfquant
from hfquant import HfQuantConfig
from hfquant.nn import QuantLinear

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])


def _llama_config():
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _save(model, path):
    torch.manual_seed(0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(_llama_config()), tmp_path_factory.mktemp("llama") / "float")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(text_config=_llama_config(), vision_config=vision, image_token_index=255)
    return _save(LlavaForConditionalGeneration(cfg), tmp_path_factory.mktemp("llava") / "float")


def _load(auto, path, **kw):
    return auto.from_pretrained(path, quantization_config=HfQuantConfig(bits=4, group_size=32, **kw))


def _kinds(model, prefix=""):
    """{layer name: "q" (hfquant QuantLinear) or "f" (nn.Linear)} of the linear layers under prefix."""
    out = {}
    for n, m in model.named_modules():
        if n.startswith(prefix) and (type(m) is nn.Linear or isinstance(m, QuantLinear)):
            out[n] = "q" if isinstance(m, QuantLinear) else "f"
    return out


def _reload_same(model, auto, path, **inputs):
    """Saves the quantized model, reloads it without a config and checks the logits are equal."""
    hfquant.save_pretrained(model, path)
    again = auto.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    return again


# --- names at any depth ---------------------------------------------------------------------

def test_block_name_keeps_everything_under_it(llama, tmp_path):
    m = _load(AutoModelForCausalLM, llama, modules_to_not_convert=["model.layers.1"])
    assert set(_kinds(m, "model.layers.1").values()) == {"f"} and len(_kinds(m, "model.layers.1")) == 7
    assert set(_kinds(m, "model.layers.0").values()) == {"q"}
    assert isinstance(m.lm_head, QuantLinear)  # a list given by the user has no default entries
    again = _reload_same(m, AutoModelForCausalLM, tmp_path / "q", input_ids=IDS)
    assert _kinds(again) == _kinds(m)


def test_suffix_of_a_block_and_a_layer(llama):
    m = _load(AutoModelForCausalLM, llama, modules_to_not_convert=["lm_head", "mlp", "layers.0.self_attn.q_proj"])
    kinds = _kinds(m)
    assert [n for n, k in kinds.items() if k == "f"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "lm_head"]


def test_regex_keys_match_from_the_start(llama):
    m = _load(AutoModelForCausalLM, llama, modules_to_not_convert=[r"re:.*self_attn\.[qk]_proj$", "re:lm_"])
    assert [n for n, k in _kinds(m).items() if k == "f"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "lm_head"]
    # re.match: "re:model.layers.1" is a block of the model (everything under it, as a name would be)
    m = _load(AutoModelForCausalLM, llama, modules_to_not_convert=[r"re:model\.layers\.1"])
    assert [n for n, k in _kinds(m).items() if k == "f"] == list(_kinds(m, "model.layers.1"))


@pytest.mark.parametrize("kw,msg", [
    (dict(modules_to_not_convert=["re:layers"]),
     'hfquant: modules_to_not_convert names "re:layers", which matches no module of the model '
     "(patterns match from the start of the name: did you mean re:.*layers?)"),
    (dict(modules_to_not_convert=["re:.*visual"]),
     'hfquant: modules_to_not_convert names "re:.*visual", which matches no module of the model'),
    (dict(modules_to_not_convert=["model.layers.7"]),
     'hfquant: modules_to_not_convert names "model.layers.7", which matches no module of the model '
     "(did you mean: model.layers.1, model.layers.0, model.layers?)"),
    (dict(modules_to_not_convert=["re:("]),
     'hfquant: modules_to_not_convert: "re:(" is not a valid regular expression '
     "(missing ), unterminated subpattern at position 0)"),
    (dict(modules_override={"re:.*vision.*": {"bits": 8}}),
     "hfquant: modules_override names 're:.*vision.*', but the model has no module of that name"),
    (dict(modules_override={"model.layer.1": {"bits": 8}}),
     "hfquant: modules_override names 'model.layer.1', but the model has no module of that name "
     "(did you mean: model.layers.1, model.layers.0, model.layers?)"),
])
def test_keys_matching_nothing(llama, kw, msg):
    with pytest.raises(ValueError) as e:
        _load(AutoModelForCausalLM, llama, **kw)
    assert str(e.value) == msg


def test_override_of_a_block_the_nearest_entry_wins(llama, tmp_path):
    # the layer's own entry wins over its block's, whichever comes first in the dict
    for over in ({"model.layers.0": {"bits": 8, "group_size": -1}, "layers.0.mlp.down_proj": {"bits": 4}},
                 {"layers.0.mlp.down_proj": {"bits": 4}, "model.layers.0": {"bits": 8, "group_size": -1}}):
        m = _load(AutoModelForCausalLM, llama, modules_override=over)
        layers = m.model.layers
        assert (layers[0].self_attn.q_proj.bits, layers[0].self_attn.q_proj.group_size) == (8, -1)
        assert (layers[0].mlp.down_proj.bits, layers[0].mlp.down_proj.group_size) == (4, -1)
        assert (layers[1].mlp.down_proj.bits, layers[1].mlp.down_proj.group_size) == (4, 32)
    _reload_same(m, AutoModelForCausalLM, tmp_path / "q", input_ids=IDS)
    m = _load(AutoModelForCausalLM, llama, modules_override={r"re:.*\.1\.mlp": {"bits": 8}})
    assert [m.model.layers[i].mlp.up_proj.bits for i in (0, 1)] == [4, 8]


# --- multimodal models ------------------------------------------------------------------------

def test_llava_keeps_vision_tower_and_projector(llava, tmp_path):
    cfg = HfQuantConfig(bits=4, group_size=32)
    m = AutoModelForImageTextToText.from_pretrained(llava, quantization_config=cfg)
    assert set(_kinds(m, "model.vision_tower").values()) == {"f"}
    assert _kinds(m, "model.multi_modal_projector") == {"model.multi_modal_projector.linear_1": "f",
                                                        "model.multi_modal_projector.linear_2": "f"}
    assert set(_kinds(m, "model.language_model").values()) == {"q"} and type(m.lm_head) is nn.Linear
    assert m.config.quantization_config.modules_to_not_convert == [
        "lm_head", "model.vision_tower", "model.multi_modal_projector"]
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1] + [255] * 16 + [5, 9, 17]])
    again = _reload_same(m, AutoModelForImageTextToText, tmp_path / "q", input_ids=ids, pixel_values=pixels)
    assert _kinds(again) == _kinds(m)
    # the same config object on a text model: the entries found for the other model are gone
    t = AutoModelForCausalLM.from_pretrained(_text_only(llava), quantization_config=cfg)
    assert cfg.modules_to_not_convert == ["lm_head"] and type(t.lm_head) is nn.Linear


def _text_only(llava):
    torch.manual_seed(0)
    path = llava.parent / "text"
    LlamaForCausalLM(_llama_config()).save_pretrained(path)
    return path


def test_llava_quantize_the_vision_tower_too(llava, tmp_path):
    # a list given by the user replaces the default entries: only lm_head stays float here
    m = _load(AutoModelForImageTextToText, llava, modules_to_not_convert=["lm_head"])
    assert set(_kinds(m, "model.vision_tower").values()) == {"q"}
    assert set(_kinds(m, "model.multi_modal_projector").values()) == {"q"}
    _reload_same(m, AutoModelForImageTextToText, tmp_path / "q", input_ids=IDS)
    m = _load(AutoModelForImageTextToText, llava, modules_to_not_convert=["lm_head", "multi_modal_projector"])
    assert set(_kinds(m, "model.vision_tower").values()) == {"q"}
    assert set(_kinds(m, "model.multi_modal_projector").values()) == {"f"}


def test_gemma3_keeps_vision_tower(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                            sliding_window=16)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=255,
                       boi_token_index=253, eoi_token_index=254)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(tmp_path / "float")
    m = _load(AutoModelForImageTextToText, tmp_path / "float")
    assert set(_kinds(m, "model.vision_tower").values()) == {"f"}
    assert set(_kinds(m, "model.language_model").values()) == {"q"} and type(m.lm_head) is nn.Linear
    # Gemma's scaled embedding (its own forward) stays float: recorded, so the checkpoint reloads it so
    assert m.config.quantization_config.modules_to_not_convert == [
        "lm_head", "model.vision_tower", "model.multi_modal_projector", "language_model.embed_tokens"]
    assert type(m.model.language_model.embed_tokens).__name__ == "Gemma3TextScaledWordEmbedding"
    _reload_same(m, AutoModelForImageTextToText, tmp_path / "q", input_ids=IDS)


# --- output heads tied to the input embedding -------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # a bias that is not zero: a lost one shows in the logits
    return _save(model, tmp_path_factory.mktemp("bert") / "float")


def test_bert_tied_decoder_stays_float_by_default(bert, tmp_path):
    m = _load(AutoModelForMaskedLM, bert)
    assert type(m.cls.predictions.decoder) is nn.Linear
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    assert isinstance(m.bert.encoder.layer[0].attention.self.query, QuantLinear)
    # the word embedding shares its weight with the biased decoder, so it stays float too (recorded); the
    # position and token type embeddings are quantized at 8 bits by default
    # (recorded without the base model's prefix: the name then also serves BertModel alone)
    assert m.config.quantization_config.modules_to_not_convert == ["lm_head", "cls.predictions.decoder",
                                                                   "embeddings.word_embeddings"]
    assert m.bert.embeddings.position_embeddings.bits == 8
    _reload_same(m, AutoModelForMaskedLM, tmp_path / "q", input_ids=IDS)


@pytest.mark.parametrize("bits", [4, 8])
def test_bert_decoder_quantized_reloads(bert, tmp_path, bits):
    m = AutoModelForMaskedLM.from_pretrained(bert, quantization_config=HfQuantConfig(
        bits=bits, group_size=32, modules_to_not_convert=[]))
    dec = m.cls.predictions.decoder
    assert isinstance(dec, QuantLinear)
    assert torch.equal(dec.bias, m.cls.predictions.bias) and dec.bias is not m.cls.predictions.bias
    again = _reload_same(m, AutoModelForMaskedLM, tmp_path / "q", input_ids=IDS)
    assert torch.equal(again.cls.predictions.decoder.bias, m.cls.predictions.bias)


def test_bert_decoder_quantized_in_memory_reloads(bert, tmp_path):
    model = BertForMaskedLM.from_pretrained(bert)
    m = hfquant.quantize_model(model, HfQuantConfig(bits=4, group_size=32, modules_to_not_convert=[]))
    assert isinstance(m.cls.predictions.decoder, QuantLinear)
    _reload_same(m, AutoModelForMaskedLM, tmp_path / "q", input_ids=IDS)


def test_t5_tied_lm_head(tmp_path):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, tie_word_embeddings=True)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "float")
    inputs = dict(input_ids=IDS, decoder_input_ids=IDS[:, :4])
    m = _load(AutoModelForSeq2SeqLM, tmp_path / "float", quantize_embeddings=False)
    assert type(m.lm_head) is nn.Linear and isinstance(m.encoder.block[0].layer[1].DenseReluDense.wi, QuantLinear)
    assert m.config.quantization_config.modules_to_not_convert == ["lm_head"]
    _reload_same(m, AutoModelForSeq2SeqLM, tmp_path / "q", **inputs)
    # the default below 8 bits quantizes embeddings at 8 bits, but T5's encoder and decoder share the table
    # of `shared` (embeddings tied to an embedding): those stay float, recorded, and the tied lm_head with
    # them; the relative position biases (embeddings of their own) are quantized
    m = _load(AutoModelForSeq2SeqLM, tmp_path / "float")
    assert type(m.lm_head) is nn.Linear and type(m.shared) is nn.Embedding
    assert m.encoder.embed_tokens.weight is m.shared.weight
    assert m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.bits == 8
    assert m.config.quantization_config.modules_to_not_convert == [
        "lm_head", "shared", "encoder.embed_tokens", "decoder.embed_tokens"]
    _reload_same(m, AutoModelForSeq2SeqLM, tmp_path / "q3", **inputs)
    m = _load(AutoModelForSeq2SeqLM, tmp_path / "float", modules_to_not_convert=[])
    assert isinstance(m.lm_head, QuantLinear)
    _reload_same(m, AutoModelForSeq2SeqLM, tmp_path / "q2", **inputs)


def test_bert_quantized_embeddings_keep_the_biased_head_table(bert, tmp_path, caplog):
    # the decoder has a bias, which a shared quantized table (TiedQuantLinear) does not hold
    m = _load(AutoModelForMaskedLM, bert, quantize_embeddings=True)
    assert caplog.messages.count("hfquant: bert.embeddings.word_embeddings stays in full precision: "
                                 "cls.predictions.decoder shares its weight and has a bias, which a shared quantized "
                                 "table does not hold") == 1  # said once
    assert type(m.bert.embeddings.word_embeddings) is nn.Embedding and type(m.cls.predictions.decoder) is nn.Linear
    assert type(m.bert.embeddings.position_embeddings).__name__ == "QuantEmbedding"
    # recorded as kept float: the reload, where the tie is gone, keeps it float too
    assert m.config.quantization_config.modules_to_not_convert[-1] == "embeddings.word_embeddings"
    _reload_same(m, AutoModelForMaskedLM, tmp_path / "q", input_ids=IDS)


def test_one_config_for_two_models_makes_its_entries_per_model(bert, llama):
    """The entries the defaults add while a model is quantized (modules kept float, the
    embeddings' 8 bits) are made again for the next model the same config object serves, not
    carried over (quantize_model keeps the object; from_pretrained works on its own copy)."""
    cfg = HfQuantConfig(bits=4, group_size=32)
    hfquant.quantize_model(AutoModelForMaskedLM.from_pretrained(bert), cfg)
    assert "embeddings.word_embeddings" in cfg.modules_to_not_convert
    assert set(cfg.modules_override) == {"embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    m = hfquant.quantize_model(AutoModelForCausalLM.from_pretrained(llama), cfg)
    assert "embeddings.word_embeddings" not in cfg.modules_to_not_convert
    assert cfg.modules_override == {"embed_tokens": {"bits": 8}} and m.model.embed_tokens.bits == 8
