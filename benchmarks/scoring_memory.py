"""
Peak memory of scoring (fast.fused_logprobs_and_entropy): in chunks of rows, in one chunk, and the
usual way (full logits from the model, log_softmax, autograd), for reference.

Each measurement runs in a fresh process and reports the growth of its peak RSS over the RSS just
before scoring, so the model's own weights are not counted. Default: B x T = 8 x 512 completion
tokens (plus a 64-token prompt), V = 50,000, a 2-layer Llama with hidden size 256.

  python benchmarks/scoring_memory.py            # prints a table: the three ways, no grad vs grad
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(batch, tokens, vocab, chunk_rows, grad):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from fast import fused_logprobs_and_entropy
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    prompt = 64
    ids = torch.randint(0, vocab, (batch, prompt + tokens))
    mask = torch.ones_like(ids)
    completion_mask = torch.ones(batch, tokens, dtype=torch.long)
    before = peak_rss_mb()
    with torch.set_grad_enabled(grad):
        if chunk_rows == 0:  # the usual way: every position's logits, autograd through log_softmax
            logp_all = model(input_ids=ids, attention_mask=mask).logits[:, prompt - 1:-1].float().log_softmax(-1)
            logp = logp_all.gather(-1, ids[:, prompt:, None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            logp, entropy = fused_logprobs_and_entropy(model, ids, mask, completion_mask, chunk_rows=chunk_rows)
        if grad:
            (logp.sum() + entropy.sum()).backward()
    return peak_rss_mb() - before


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows B")
    parser.add_argument("--tokens", type=int, default=512, help="completion tokens T per row")
    parser.add_argument("--vocab", type=int, default=50_000, help="vocabulary size V")
    parser.add_argument("--chunk-rows", type=int, default=512, help="rows of logits per chunk when chunked")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        chunk_rows, grad = json.loads(args.child)
        print(json.dumps(measure(args.batch, args.tokens, args.vocab, chunk_rows, grad)))
        return
    full = args.batch * args.tokens
    print(f"scoring B x T = {args.batch} x {args.tokens}, V = {args.vocab:,}: one fp32 (B*T, V) tensor is "
          f"{full * args.vocab * 4 / 2**20:,.0f} MB")
    print(f"{'':26}{'no grad':>12}{'grad + backward':>18}")
    for label, chunk_rows in ((f"chunked ({args.chunk_rows} rows)", args.chunk_rows), ("one chunk", full),
                              ("full logits + autograd", 0)):
        row = []
        for grad in (False, True):
            out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--tokens", str(args.tokens),
                                  "--vocab", str(args.vocab), "--child", json.dumps([chunk_rows, grad])],
                                 capture_output=True, text=True, check=True)
            row.append(float(out.stdout.strip().splitlines()[-1]))
        print(f"{label:26}{row[0]:>9,.0f} MB{row[1]:>15,.0f} MB")


if __name__ == "__main__":
    main()
