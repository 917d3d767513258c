"""A table of user mistakes: each gets a non-zero exit and one line naming the culprit, no traceback."""

from __future__ import annotations

import pytest

from dpokit import cli


@pytest.fixture(scope="module")
def world(tiny_model_dir, toy_data, tmp_path_factory):
    """Files the cases point at; `{model}`, `{data}`, `{d}` in a case are filled from here."""
    d = tmp_path_factory.mktemp("bad")
    good = toy_data[0].read_text().splitlines()
    files = {
        "empty.jsonl": "",
        "blank.jsonl": "\n\n",
        "badjson.jsonl": "\n".join(good[:2] + ["{oops"]) + "\n",
        "list.jsonl": "[1, 2]\n",
        "norej.jsonl": '{"prompt": "a", "chosen": "b"}\n',
        "wrongtype.jsonl": '{"prompt": "a", "chosen": "b", "rejected": ["c"]}\n',
        "emptychosen.jsonl": '{"prompt": "a", "chosen": "  ", "rejected": "c"}\n',
        "nullprompt.jsonl": '{"prompt": null, "chosen": "b", "rejected": "c"}\n',
        "identical.jsonl": '{"prompt": "the film", "chosen": " great", "rejected": " great"}\n',
        "badyaml.yaml": "model: [unclosed\n",
        "unknown.yaml": "betaa: 0.1\n",
        "wrongtype.yaml": "loss: {beta: high}\n",
        "listtop.yaml": "- 1\n- 2\n",
        "afile": "x",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    (d / "nomodel").mkdir()
    (d / "full").mkdir()
    (d / "full" / "notes.txt").write_text("keep me")
    return {"model": str(tiny_model_dir), "data": str(toy_data[0]), "d": str(d)}


BASE = ["train", "--model", "{model}", "--data", "{data}", "--output", "{d}/out", "--max-steps", "1",
        "--max-length", "32", "--progress", "off"]


def _with(*changes: str, drop: tuple[str, ...] = ()) -> list[str]:
    """BASE with flags replaced or added (`--flag value` pairs) and some flags dropped."""
    args = list(BASE)
    for flag in drop:
        i = args.index(flag)
        del args[i : i + 2]
    it = iter(changes)
    for flag in it:
        value = next(it) if not flag.startswith("!") else None
        flag = flag.lstrip("!")
        if flag in args and value is not None:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    return args


CASES = [
    # (id, argv, fragments the one line must contain)
    ("unknown flag", _with("!--bogus"), ["unrecognized arguments: --bogus"]),
    ("unknown command", ["trian"], ["invalid choice: 'trian'"]),
    ("no data", _with(drop=("--data",)), ["missing required option(s): --data"]),
    ("no model", _with(drop=("--model",)), ["--model"]),
    ("no output", _with(drop=("--output",)), ["--output"]),
    ("negative beta", _with("--beta", "-1"), ["--beta must be a positive number"]),
    ("beta not a number", _with("--beta", "abc"), ["--beta: expected float, got 'abc'"]),
    ("zero learning rate", _with("--learning-rate", "0"), ["--learning-rate must be a positive number"]),
    ("nan learning rate", _with("--learning-rate", "nan"), ["--learning-rate must be a positive number"]),
    ("zero batch", _with("--batch-size", "0"), ["--batch-size must be a positive number"]),
    ("fractional batch", _with("--batch-size", "2.5"), ["--batch-size: expected int, got '2.5'"]),
    ("label smoothing too big", _with("--label-smoothing", "0.7"), ["--label-smoothing"]),
    ("unknown loss", _with("--loss", "dpoo"), ["unknown loss 'dpoo'"]),
    ("exo_pair without epsilon", _with("--loss", "exo_pair"), ["exo_pair", "--label-smoothing"]),
    ("weights count", _with("--loss", "sigmoid,sft", "--loss-weights", "1"), ["--loss-weights"]),
    ("unknown scheduler", _with("--lr-scheduler", "cosin"), ["--lr-scheduler", "invalid choice: 'cosin'"]),
    ("unknown dtype", _with("--dtype", "fp8"), ["--dtype", "invalid choice: 'fp8'"]),
    ("prompt limit above max", _with("--max-prompt-length", "64"), ["--max-prompt-length (64) must be below"]),
    ("warmup ratio", _with("--warmup-ratio", "1.5"), ["--warmup-ratio"]),
    ("zero epochs", _with("--epochs", "0"), ["--epochs must be a positive number"]),
    ("keep zero checkpoints", _with("--keep-checkpoints", "0"), ["--keep-checkpoints must be at least 1"]),
    ("adam beta", _with("--adam-beta1", "1.5"), ["--adam-beta1 must be in [0, 1)"]),
    ("unknown device", _with("--device", "tpu"), ["--device", "tpu"]),
    ("cuda missing", _with("--device", "cuda"), ["--device cuda: CUDA is not available"]),
    ("config missing", _with("--config", "{d}/nope.yaml"), ["nope.yaml does not exist"]),
    ("config bad yaml", _with("--config", "{d}/badyaml.yaml"), ["badyaml.yaml line", "not valid YAML"]),
    ("config unknown key", _with("--config", "{d}/unknown.yaml"), ["unknown option 'betaa'"]),
    ("config wrong type", _with("--config", "{d}/wrongtype.yaml"), ["loss.beta: expected float, got 'high'"]),
    ("config not a mapping", _with("--config", "{d}/listtop.yaml"), ["listtop.yaml: expected a mapping"]),
    ("data missing", _with("--data", "{d}/nope.jsonl"), ["nope.jsonl does not exist"]),
    ("data is a folder", _with("--data", "{d}"), ["is a folder but not one written by datasets.save_to_disk"]),
    ("data empty", _with("--data", "{d}/empty.jsonl"), ["empty.jsonl holds no rows"]),
    ("data blank lines", _with("--data", "{d}/blank.jsonl"), ["blank.jsonl holds no rows"]),
    ("bad json line", _with("--data", "{d}/badjson.jsonl"), ["badjson.jsonl, line 3", "not valid JSON"]),
    ("row not object", _with("--data", "{d}/list.jsonl"), ["list.jsonl, line 1", "expected a JSON object"]),
    ("missing field", _with("--data", "{d}/norej.jsonl"), ["norej.jsonl, line 1", "unknown layout (columns: chosen, prompt)"]),
    ("wrong field type", _with("--data", "{d}/wrongtype.jsonl"), ["line 1", "'rejected' must be a string"]),
    ("null prompt", _with("--data", "{d}/nullprompt.jsonl"), ["line 1", "'prompt' must be a string"]),
    ("empty response", _with("--data", "{d}/emptychosen.jsonl"), ["line 1", "'chosen' is an empty response"]),
    ("not utf-8", _with("--data", "{d}/latin1.jsonl"), ["latin1.jsonl", "not UTF-8"]),
    ("nothing left", _with("--data", "{d}/identical.jsonl"), ["identical.jsonl: no usable pairs"]),
    ("all prompts too long", _with("--max-length", "2", "--min-response-share", "0"), ["no usable pairs", "--max-length"]),
    ("eval data missing", _with("--eval-data", "{d}/nope-eval.jsonl"), ["nope-eval.jsonl does not exist"]),
    ("model missing", _with("--model", "{d}/no-model"), ["no-model does not exist"]),
    ("model not a model", _with("--model", "{d}/nomodel"), ["nomodel is not a Hugging Face model folder"]),
    ("model is a file", _with("--model", "{d}/afile"), ["afile is not a Hugging Face model folder"]),
    ("output is a file", _with("--output", "{d}/afile"), ["--output", "afile is a file"]),
    ("output not empty", _with("--output", "{d}/full"), ["full is not empty", "--overwrite"]),
    ("resume missing", _with("--resume", "{d}/no-ckpt"), ["--resume", "no such checkpoint"]),
    ("resume not a checkpoint", _with("--resume", "{d}/nomodel"), ["not a complete dpokit checkpoint"]),
]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(world, argv, fragments, capsys):
    argv = [a.format(**world) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    for fragment in fragments:
        assert fragment.format(**world) in lines[0], lines[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 30
