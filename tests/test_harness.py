"""The lm-evaluation-harness adapter on a tiny model and a task over local files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from edgequant.cli import main  # noqa: E402
from edgequant.errors import EdgequantError  # noqa: E402
from edgequant.harness import evaluate, register  # noqa: E402
from edgequant.zoo import load  # noqa: E402

QUESTIONS = [
    {"question": "one two three", "choices": [" four", " five", " alpha"], "answer": 0},
    {"question": "red green blue", "choices": [" yellow", " seven"], "answer": 1},
    {"question": "the cat sat on the", "choices": [" mat", " moon", " of"], "answer": 2},
]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        "task: edgequant_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tasks


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    # as lm_eval splits a pair: the continuation is what follows the context's own tokens
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_loglikelihood_matches_direct_computation(tiny_dir):
    path = str(tiny_dir())
    lm = register()(path)
    model, tok = load(path)
    reqs = [
        Instance("loglikelihood", {}, (q["question"], c), i)
        for i, q in enumerate(QUESTIONS)
        for c in q["choices"]
    ]
    got = lm.loglikelihood(reqs)
    for req, (ll, _) in zip(reqs, got, strict=True):
        want = direct_loglikelihood(model, tok, *req.args)
        assert math.isclose(ll, want, rel_tol=1e-4, abs_tol=1e-4)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("a b c d e",), 0)])
    assert rolling[0] < 0


def test_simple_evaluate_on_a_local_task(tiny_dir, local_task):
    res = evaluate(str(tiny_dir()), ["edgequant_local_mc"], include_path=str(local_task))
    acc = res["results"]["edgequant_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["edgequant_local_mc"]["effective"] == 3


def test_cli_tasks_and_unknown_task(capsys, tmp_path, tiny_dir, local_task):
    js = tmp_path / "t.json"
    argv = ["eval", str(tiny_dir()), "--tasks", "edgequant_local_mc"]
    argv += ["--include-path", str(local_task), "--json", str(js)]
    assert main(argv) == 0
    assert "edgequant_local_mc" in json.loads(js.read_text())["tasks"]
    with pytest.raises(EdgequantError, match="unknown lm_eval task"):
        evaluate(str(tiny_dir()), ["no_such_task_xyz"], include_path=str(local_task))
