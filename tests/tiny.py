"""Offline stand-ins for the real models, built in code: character-level tokenizers and 2-layer models.
- tiny_tokenizer + tiny_model: SmolLM2's shape (Llama, tied head, pad = EOS = <|im_end|>).
- qwen_tokenizer + tiny_qwen2: Qwen2.5-Math's (q/k/v biases, tied head as the 1.5B or untied as the 7B,
  EOS <|endoftext|> with <|im_end|> a second end token, a chat template whose default system prompt
  asks for \\boxed{}).
- write_tiny_gguf: a GGUF file for the embedded model's loading path."""

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


QWEN_SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' "
                      "%}<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n{% endif %}"
                      + CHAT_TEMPLATE)


def character_tokenizer(specials, chat_template, **tokens):
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", chat_template=chat_template, **tokens)


def tiny_tokenizer(chat_template=CHAT_TEMPLATE):
    return character_tokenizer(SPECIALS, chat_template, bos_token="<|im_start|>", eos_token="<|im_end|>",
                               pad_token="<|im_end|>")


def qwen_tokenizer():
    """Qwen2.5-Math's base tokenizer in small: EOS and pad <|endoftext|>, no BOS, <|im_end|> special."""
    return character_tokenizer(QWEN_SPECIALS, QWEN_CHAT_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(tokenizer, seed=0, layers=2, hidden=32):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def tiny_qwen2(tokenizer, seed=0, layers=2, hidden=32, tied=True):
    """Qwen2 (q/k/v biases), tied head like Qwen2.5-Math-1.5B or untied like the 7B. Its generation
    config stops at <|endoftext|> only, as the base model's does."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # transformers initializes biases to 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def write_tiny_gguf(path, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=0):
    """A 2-layer Llama as a GGUF file, with a byte-level tokenizer (no merges), SmolLM2's three special
    tokens and a chat template: the embedded model's loading path (load_embedded_gguf) in a second."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_chars = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 3 + [1] * len(byte_chars))  # 3: control (special) tokens
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    generator = torch.Generator().manual_seed(seed)
    weight = lambda *shape: (torch.randn(*shape, generator=generator) * 0.1).numpy().astype(np.float32)
    kv = kv_heads * hidden // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (intermediate, hidden)), ("ffn_up", (intermediate, hidden)),
                            ("ffn_down", (hidden, intermediate))]:
            writer.add_tensor(f"blk.{i}.{name}.weight",
                              np.ones(shape, np.float32) if len(shape) == 1 else weight(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sharpened(model):
    """Weights x 20 (norms aside): a default-initialised tiny model hardly depends on its context or
    positions, so a wrong position or cache entry would change no token; a sharpened one's do."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(20)
    return model
