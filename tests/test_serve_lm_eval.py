"""lm-evaluation-harness scores a multiple-choice task through `bitnet serve` with its
local-completions model, as its users point it at a server: prompts sent as token ids of the
exported Hugging Face tokenizer, `echo` with `logprobs` 1 and `max_tokens` 1, each choice's
log-likelihood the sum of the token_logprobs after the context's length (the generated token
sliced off), is_greedy from top_logprobs. Its accuracy, and its answer to each item, are those
of bitnet's own model scoring the same token ids in-process."""

import json
import random

import torch

from bitnet_cli.data.stories import ANIMALS, COLOURS, FEELINGS, FRIENDS, NAMES, PLACES, THINGS
from bitnet_cli.use.loading import load_model
from tests.cli import invoke, optional
from tests.serving import ServerProcess

lm_eval = optional("lm_eval", whole_file=True)
for _module in ("tenacity", "aiohttp", "transformers"):  # lm-eval[api], its HF tokenizer
    optional(_module, whole_file=True)

TASK = "bitnet_story_choice"
ITEMS = 32
CONTEXT = 64  # the tiny tinystories model's context: lm-eval's max_length, prompt + 1 token


def story_items(count: int) -> list[dict]:
    """Story openings with 4 candidate next words. Most ask for a word of the right kind (a
    name after "named", a place after "went to the"), which a short run has partly learned;
    a quarter ask which thing the story is about, among things, which it mostly has not."""
    rng = random.Random(0)
    items = []
    for i in range(count):
        name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
        thing, colour, feeling = rng.choice(THINGS), rng.choice(COLOURS), rng.choice(FEELINGS)
        other_name = rng.choice([n for n in NAMES if n != name])
        other_place = rng.choice([p for p in PLACES if p != place])
        kind = i % 4
        if kind == 0:
            context, right = f"Once upon a time, there was a little {animal} named", name
            wrong = [place, feeling, thing]
        elif kind == 1:
            context, right = f"One day, a {animal} named {name} went to the", place
            wrong = [other_name, feeling, colour]
        elif kind == 2:
            context = f"{name} liked to play in the {place}. One day, {name} found a {colour}"
            right, wrong = thing, [other_place, other_name, feeling]
        else:
            friend = rng.choice(FRIENDS)
            context = (f"In the {place}, {name} lost a {thing}. {name} ran home to tell the "
                       f"{friend} about the")
            right, wrong = thing, rng.sample([t for t in THINGS if t != thing], 3)
        label = rng.randrange(4)
        items.append({"context": context, "choices": wrong[:label] + [right] + wrong[label:],
                      "label": label})
    return items


def write_task(folder, items: list[dict]) -> None:
    """The task as lm-eval's new-task guide writes one: a local JSON file through the `json`
    dataset builder (its cache in the folder too), multiple choice, accuracy."""
    (folder / "items.json").write_text(json.dumps(items))
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(folder / "items.json"))}
  cache_dir: {json.dumps(str(folder / "datasets-cache"))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation ids (TemplateLM._encode_pair
    for a causal model): the context's trailing spaces moved to the continuation, the whole
    encoded, the continuation the ids after the context's own encoding."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    return context_ids, whole[len(context_ids):]


def scored_in_process(run, items: list[dict], hf_tokenizer) -> list[list[tuple[float, bool]]]:
    """Each item's choices as lm-eval scores them, by bitnet's model in this process: the sum of
    the continuation's log-softmax over a forward pass of context + continuation (an item's
    choices in one batch, padded at the end, which a causal model's earlier places never see),
    and whether each continuation token is the most likely one at its place."""
    loaded = load_model(str(run), "cpu")
    scores = []
    with torch.inference_mode():
        for item in items:
            pairs = [encode_pair(loaded.tokenizer, item["context"], " " + choice)
                     for choice in item["choices"]]  # " ": lm-eval's target_delimiter
            for choice, (context, continuation) in zip(item["choices"], pairs):
                # lm-eval sends the exported tokenizer's ids: the same as bitnet's own
                assert hf_tokenizer(item["context"] + " " + choice,
                                    add_special_tokens=False).input_ids == context + continuation
            width = max(len(c) + len(t) for c, t in pairs)
            batch = torch.tensor([c + t + [0] * (width - len(c) - len(t)) for c, t in pairs])
            logprobs = torch.log_softmax(loaded.model(batch).float(), -1)
            row = []
            for rows, (context, continuation) in zip(logprobs, pairs):
                picked = [(rows[len(context) - 1 + j], token)
                          for j, token in enumerate(continuation)]
                row.append((sum(float(p[token]) for p, token in picked),
                            all(int(p.argmax()) == token for p, token in picked)))
            scores.append(row)
    return scores


def first_best(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of a tie, as np.argmax


def test_lm_eval_accuracy_through_serve_equals_bitnets_own_scores(short_run, tmp_path):
    from lm_eval.tasks import TaskManager
    transformers = optional("transformers")
    run = short_run("tinystories")
    export = tmp_path / "hf"
    invoke("export", run, "--format", "hf", "--out", export)  # the tokenizer lm-eval reads
    items = story_items(ITEMS)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, items)

    with ServerProcess(run.parent.parent, "tinystories", "--device", "cpu") as server:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{server.url}/v1/completions", "model": server.name,
                        "tokenizer": str(export), "tokenizer_backend": "huggingface",
                        "tokenized_requests": True, "max_length": CONTEXT,
                        # 4 prompts a request (a list of id lists), 2 requests at a time
                        "batch_size": 4, "num_concurrent": 2, "max_retries": 1},
            tasks=[TASK], task_manager=TaskManager(include_path=str(tasks),
                                                   include_defaults=False),
            log_samples=True, bootstrap_iters=0,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        assert server.stop() == 0
        while server.new_lines.get(timeout=30) is not None:  # every line it wrote, read
            pass
    requests = [line for line in server.lines if "POST /v1/completions" in line]
    assert requests and all(" 200 " in line for line in requests), "\n".join(requests)

    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(ITEMS))
    served = [[(float(ll), bool(greedy)) for ll, greedy in s["filtered_resps"]]
              for s in samples]
    ours = scored_in_process(run, items, transformers.AutoTokenizer.from_pretrained(export))

    # The server's prompt pass (a KV cache filled) and a plain batched forward: the same floats
    # (measured equal to the bit; the closest two choices of an item were 0.004 apart)
    worst = max(abs(a[0] - b[0]) for s, o in zip(served, ours) for a, b in zip(s, o))
    assert worst < 1e-4, worst
    assert [[g for _, g in s] for s in served] == [[g for _, g in o] for o in ours]
    chosen = [first_best([ll for ll, _ in s]) for s in served]
    assert chosen == [first_best([ll for ll, _ in o]) for o in ours]
    correct = [c == item["label"] for c, item in zip(chosen, items)]
    assert [s["acc"] == 1.0 for s in samples] == correct
    accuracy = out["results"][TASK]["acc,none"]
    assert accuracy == sum(correct) / ITEMS
