"""The Qwen3-Reranker model card's recipe, written plainly, as the yardstick for
every score the service computes: left padding, the full causal LM, the
vocabulary-sized logits of the last position, log-softmax over (no, yes)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_instruction(instruction, query, doc):
    if instruction is None:
        instruction = "Given a web search query, retrieve relevant passages that answer the query"
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


class Recipe:
    def __init__(self, model_dir, max_length=8192, dtype=torch.float32, attn_implementation="sdpa"):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation
        ).eval()
        self.max_length = max_length
        self.prefix_tokens = self.tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        return self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)

    def token_ids(self, instruction, query, documents):
        """The recipe's unpadded input ids per document."""
        pairs = [format_instruction(instruction, query, doc) for doc in documents]
        inputs = self.process_inputs(pairs)
        return [
            ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
        ]

    @torch.no_grad()
    def scores(self, instruction, query, documents):
        """(probability of "yes", logit difference) per document, one document at a
        time so that no padding is involved."""
        out = []
        for doc in documents:
            inputs = self.process_inputs([format_instruction(instruction, query, doc)])
            batch_scores = self.model(**inputs).logits[:, -1, :]
            true_vector = batch_scores[:, self.token_true_id]
            false_vector = batch_scores[:, self.token_false_id]
            stacked = torch.stack([false_vector, true_vector], dim=1)
            log_probs = torch.nn.functional.log_softmax(stacked.float(), dim=1)
            out.append((log_probs[0, 1].exp().item(), (true_vector - false_vector).float().item()))
        return out
