"""A fine-tuning demonstration that runs on a CPU: teach a model a made-up answer format.

The task: given a sentence that mentions one animal, answer ``<<ZORP:animal>>``. No base model
knows the Zorp format, so held-out accuracy starts near zero; the held-out sentences use animals
and sentence templates never seen in training, so a high score is learning, not recall.

    python examples/lora-demo/zorp.py --model smollm2-135m-instruct --out runs/zorp

It writes train.jsonl / test.jsonl, fine-tunes with LoRA, and prints exact-match accuracy on the
held-out set before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

TRAIN_ANIMALS = """cat dog horse cow sheep goat pig rabbit mouse rat fox wolf bear lion tiger zebra giraffe camel
donkey deer moose otter beaver badger squirrel hedgehog bat owl eagle hawk crow duck goose swan turkey
chicken parrot penguin seal walrus whale dolphin shark salmon trout frog toad snake lizard turtle""".split()
TEST_ANIMALS = "panda koala hippo rhino gorilla llama lynx ferret pelican heron flamingo jaguar".split()
TRAIN_TEMPLATES = [
    "I saw a {a} in the garden this morning.", "My neighbour keeps a {a} behind the house.",
    "There is a {a} sleeping under the old bridge.", "The children drew a {a} on the wall.",
    "Yesterday a {a} crossed the road near the school.", "We read a story about a brave {a}.",
    "A {a} was standing quietly by the river.", "The zoo has a new {a} this year.",
    "Have you ever touched a {a}?", "Grandma once found a {a} in her kitchen.",
    "The painting shows a {a} under the moon.", "Nobody expected a {a} at the wedding.",
]
TEST_TEMPLATES = [
    "On the hill we noticed a {a} eating grass.", "The photographer waited hours for a {a}.",
    "My cousin says a {a} followed him home.", "In the documentary, a {a} looked for food.",
]
INSTRUCTION = "Reply in Zorp format: name the animal in this sentence.\n\n"


def make_rows(animals, templates, n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, t = rng.choice(animals), rng.choice(templates)
        rows.append({"messages": [{"role": "user", "content": INSTRUCTION + t.format(a=a)},
                                  {"role": "assistant", "content": f"<<ZORP:{a}>>"}]})
    return rows


def accuracy(llm, rows) -> float:
    right = 0
    for row in rows:
        answer = llm.chat(row["messages"][:1], temperature=0, max_tokens=16).strip()
        right += answer == row["messages"][1]["content"]
    return right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="runs/zorp")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import llmkit
    from llmkit.train.finetune import finetune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = make_rows(TRAIN_ANIMALS, TRAIN_TEMPLATES, args.train, seed=1)
    test = make_rows(TEST_ANIMALS, TEST_TEMPLATES, args.test, seed=2)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    before = accuracy(llmkit.load(args.model), test)
    print(f"held-out accuracy before: {before:.2f}")
    t0 = time.perf_counter()
    finetune(args.model, out / "train.jsonl", out / "model", method="lora", lora_rank=args.rank,
             lora_alpha=2 * args.rank, lora_targets="all", lr=args.lr, max_steps=args.max_steps,
             batch_size=args.batch_size, checkpoint_interval=20, overwrite=True)  # each run starts afresh
    minutes = (time.perf_counter() - t0) / 60
    after = accuracy(llmkit.load(out / "model"), test)
    print(f"held-out accuracy after:  {after:.2f} ({args.max_steps} LoRA steps, {minutes:.1f} minutes of training)")


if __name__ == "__main__":
    main()
