"""A table of user mistakes: each gets a non-zero exit and one line naming the culprit, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from dpokit import cli
from dpokit.experiments.demo.bundled import BASE_MODEL_DIR


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
    # Inputs that a mistaken output would destroy: a model copy, data, prompts, a config, a cache.
    shutil.copytree(tiny_model_dir, d / "mymodel")
    (d / "modellink").symlink_to(d / "mymodel", target_is_directory=True)
    (d / "nested").mkdir()
    for name in ("pairs.jsonl", "prompts.jsonl"):
        (d / "nested" / name).write_text("\n".join(good[:4]) + "\n")
    (d / "nested" / "template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (d / "nested" / "train.yaml").write_text("beta: 0.1\n")
    (d / "deep.jsonl").write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "surrogate.jsonl").write_text(good[0] + "\n" + '{"prompt": "a\\ud800b", "chosen": "x", "rejected": "y"}\n')
    (d / "surrogate.json").write_text('[{"prompt": "a\\udc00", "chosen": "x", "rejected": "y"}]')
    shutil.copytree(tiny_model_dir, d / "badweights")
    weights = d / "badweights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(tiny_model_dir, d / "garbageweights")
    (d / "garbageweights" / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    (d / "dupkey.yaml").write_text("beta: 0.1\nbatch_size: 4\nbeta: 5\n")
    (d / "dupsection.yaml").write_text("beta: 0.1\nloss:\n  beta: 5\n")
    (d / "boolcount.yaml").write_text("train:\n  learning_rate: 0.001\n  batch_size: true\n")
    (d / "boolrate.yaml").write_text("beta: false\n")
    (d / "usr.jsonl").write_text(json.dumps({"chosen": [{"role": "usr", "content": "hi"},
                                                        {"role": "assistant", "content": "a"}],
                                             "rejected": [{"role": "usr", "content": "hi"},
                                                          {"role": "assistant", "content": "b"}]}) + "\n")
    (d / "usrprompt.jsonl").write_text(json.dumps({"prompt": [{"role": "usr", "content": "hi"}]}) + "\n")
    (d / "cache").mkdir()
    (d / "run").mkdir()
    (d / "run" / "report.md").write_text("\n".join(good[:2]) + "\n")
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
    ("unknown flag", _with("!--bogus"), ["dpokit train: error: unrecognized option --bogus"]),
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
    ("data is a folder", _with("--data", "{d}/nomodel"), ["is a folder but not one written by datasets.save_to_disk"]),
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
    ("resume missing", _with("--resume", "{d}/no-ckpt"), ["--resume", "no such checkpoint"]),
    ("resume not a checkpoint", _with("--resume", "{d}/nomodel"), ["not a complete dpokit checkpoint"]),
]

NEVER_OVER_INPUTS = "dpokit never writes over its own inputs"
PAIRS, PROMPTS = "{d}/nested/pairs.jsonl", "{d}/nested/prompts.jsonl"
SMALL = ["--max-new-tokens", "2", "--progress", "off"]
# Inputs are never outputs (issue 21.1): every writing command, whatever --overwrite says.
CASES += [
    ("train output is the model", _with("--model", "{d}/mymodel", "--output", "{d}/mymodel", "!--overwrite"),
     ["--output {d}/mymodel is --model {d}/mymodel", NEVER_OVER_INPUTS]),
    ("train output is the model by a symlink",
     _with("--model", "{d}/mymodel", "--output", "{d}/modellink", "!--overwrite"), ["is --model"]),
    ("train output is the model by ..",
     _with("--model", "{d}/mymodel", "--output", "{d}/nested/../mymodel", "!--overwrite"), ["is --model"]),
    ("train output inside the model", _with("--model", "{d}/mymodel", "--output", "{d}/mymodel/run"),
     ["lies inside --model"]),
    ("train output holds the data", _with("--data", PAIRS, "--output", "{d}/nested", "!--overwrite"),
     ["--output {d}/nested contains --data " + PAIRS]),
    ("train output is the eval data", _with("--eval-data", PAIRS, "--output", PAIRS), ["is --eval-data"]),
    ("train output holds the tokenizer", _with("--tokenizer", "{d}/mymodel", "--output", "{d}", "!--overwrite"),
     ["contains --tokenizer"]),
    ("train output holds the reference model",
     _with("--reference-model", "{d}/mymodel", "--output", "{d}", "!--overwrite"), ["contains --reference-model"]),
    ("train output holds the chat template",
     _with("--chat-template", "{d}/nested/template.jinja", "--output", "{d}/nested", "!--overwrite"),
     ["contains --chat-template"]),
    ("train output holds the config",
     _with("--config", "{d}/nested/train.yaml", "--output", "{d}/nested", "!--overwrite"), ["contains --config"]),
    ("train reference cache is the data", _with("--reference-cache", "{data}"), ["--reference-cache", "is --data"]),
    ("train output inside the reference cache", _with("--reference-cache", "{d}/cache", "--output", "{d}/cache/r"),
     ["--output {d}/cache/r lies inside --reference-cache {d}/cache"]),
    ("sample output is the prompts",
     ["sample", "--model", "{model}", "--prompts", PROMPTS, "--output", PROMPTS, *SMALL], ["is --prompts"]),
    ("evaluate output is the data",
     ["evaluate", "--model", "{model}", "--reference-model", "{model}", "--data", PAIRS, "--output", PAIRS,
      "--max-length", "32"], ["--output " + PAIRS + " is --data"]),
    ("evaluate output inside the model",
     ["evaluate", "--model", "{d}/mymodel", "--reference-model", "{model}", "--data", PAIRS, "--output",
      "{d}/mymodel/eval.json", "--max-length", "32"], ["lies inside --model"]),
    ("inspect plot is the data", ["data", "inspect", PAIRS, "--plot", PAIRS], ["--plot " + PAIRS + " is PATH"]),
    ("export over its run", ["export", "{d}/mymodel", "--output", "{d}/mymodel", "--overwrite"], ["is RUN"]),
    ("sweep output holds the prompts",
     ["sweep", "--model", "{model}", "--data", PAIRS, "--output", "{d}/nested", "--overwrite", "--prompts",
      PROMPTS, "--judge", "sentiment", "--beta", "0.1", "--max-steps", "1", *SMALL], ["contains --data"]),
    ("online output holds the prompts",
     ["online", "--model", "{model}", "--output", "{d}/nested", "--overwrite", "--prompts", PROMPTS, "--judge",
      "sentiment", "--rounds", "1", "--max-steps", "1", *SMALL], ["contains --prompts"]),
    ("report over its prompts", ["report", "{d}/run", "--prompts", "{d}/run/report.md"], ["is --prompts"]),
    # Named one-line errors where `internal error` answered (issue 21.3).
    ("json nested too deep", _with("--data", "{d}/deep.jsonl"), ["deep.jsonl, line 1", "JSON nested deeper"]),
    ("json array nested too deep", _with("--data", "{d}/deep.json"), ["deep.json", "JSON nested deeper"]),
    ("lone surrogate escape", _with("--data", "{d}/surrogate.jsonl"),
     ["surrogate.jsonl, line 2", "lone UTF-16 surrogate escape (\\ud800)"]),
    ("lone surrogate in a json array", _with("--data", "{d}/surrogate.json"),
     ["surrogate.json, row 1", "lone UTF-16 surrogate escape (\\udc00)"]),
    ("lone surrogate in prompts",
     ["sample", "--model", "{model}", "--prompts", "{d}/surrogate.jsonl", *SMALL], ["surrogate.jsonl, line 2"]),
    ("truncated model weights", _with("--model", "{d}/badweights"),
     ["{d}/badweights/model.safetensors is damaged"]),
    ("garbage model weights", ["sample", "--model", "{d}/garbageweights", "--prompt", "hi", *SMALL],
     ["{d}/garbageweights/model.safetensors is damaged"]),
    ("output below a file", _with("--output", "{d}/afile/run"),
     ["--output {d}/afile/run: cannot be created, because {d}/afile is a file"]),
    ("reference cache below a file", _with("--reference-cache", "{d}/afile/cache"),
     ["--reference-cache {d}/afile/cache: cannot be created"]),
    ("plot below a file", ["data", "inspect", "{data}", "--plot", "{d}/afile/lengths.png"],
     ["--plot {d}/afile/lengths.png: cannot be created, because {d}/afile is a file"]),
    ("export below a file", ["export", "{model}", "--output", "{d}/afile/exported"],
     ["export: --output {d}/afile/exported: cannot be created"]),
    ("sample output below a file",
     ["sample", "--model", "{model}", "--prompt", "hi", "--output", "{d}/afile/s.jsonl", *SMALL],
     ["--output {d}/afile/s.jsonl: cannot be created"]),
    ("evaluate output below a file",
     ["evaluate", "--model", "{model}", "--reference-model", "{model}", "--data", "{data}", "--output", "{d}/afile/e.json"],
     ["--output {d}/afile/e.json: cannot be created"]),
    ("sweep output below a file",
     ["sweep", "--model", "{model}", "--data", "{data}", "--output", "{d}/afile/s", "--prompts", PROMPTS, "--judge",
      "sentiment", "--beta", "0.1"], ["--output {d}/afile/s: cannot be created"]),
    # No setting taken silently (issue 21.2).
    ("yaml duplicate key", _with("--config", "{d}/dupkey.yaml"),
     ["dupkey.yaml line 3: 'beta' is given twice (first on line 1)"]),
    ("yaml key flat and in its section", _with("--config", "{d}/dupsection.yaml"),
     ["dupsection.yaml line 3", "loss.beta is already set"]),
    ("yaml boolean for a count", _with("--config", "{d}/boolcount.yaml"),
     ["boolcount.yaml line 3: train.batch_size: expected int, got True"]),
    ("yaml boolean for a number", _with("--config", "{d}/boolrate.yaml"),
     ["boolrate.yaml line 1: beta: expected float, got False"]),
    ("unknown chat role, strict", _with("--data", "{d}/usr.jsonl", "!--strict"),
     ["usr.jsonl, line 1", "role 'usr' is not one a chat template knows", "--strict"]),
    ("unknown chat role in prompts", ["sample", "--model", "{model}", "--prompts", "{d}/usrprompt.jsonl", *SMALL],
     ["usrprompt.jsonl, line 1", "role 'usr'"]),
    ("max prompts zero", ["sample", "--model", "{model}", "--prompts", PROMPTS, "--max-prompts", "0", *SMALL],
     ["--max-prompts must be at least 1"]),
    ("report max prompts zero", ["report", "{d}/run", "--prompts", PROMPTS, "--max-prompts", "0"],
     ["--max-prompts must be at least 1"]),
    ("judge without prompts", ["evaluate", "--model", "{model}", "--reference-model", "{model}", "--data", "{data}",
                               "--judge", "sentiment"], ["--judge sentiment scores samples drawn for --prompts"]),
    # Smaller (issue 21.4).
    ("config is a folder", _with("--config", "{d}/nomodel"), ["nomodel is a folder; give --config a YAML file"]),
    ("sweep beta twice", ["sweep", "--model", "{model}", "--data", "{data}", "--output", "{d}/sw", "--prompts",
                          PROMPTS, "--judge", "sentiment", "--beta", "0.1,0.10"], ["--beta: 0.1 given twice"]),
    ("tokenizer not local, offline", _with("--tokenizer", "no_such_tok"),
     ["tokenizer no_such_tok: no such folder; as a hub id: offline"]),
    ("reference model not local, offline", _with("--reference-model", "missing"),
     ["model missing: no such folder; as a hub id: offline"]),
    ("data not local, offline", _with("--data", "mydata/pairs"),
     ["data mydata/pairs: no such file or folder; as a hub id: offline"]),
    ("demo output inside the bundled model", ["demo", "--quick", "--output", str(BASE_MODEL_DIR / "out")],
     ["lies inside the bundled base model"]),
]


# Issue 35 / 36.7: a learning-rate typo, outputs that cannot be created, a folder of files dpokit did not write.
PROC = "/proc/dpokit-test"  # a folder that exists but where nothing can be created, even by root
NOT_OURS = "{d}/full holds files dpokit did not write (notes.txt)"
CASES += [
    ("learning rate typo", _with("--learning-rate", "1e6"),
     ["--learning-rate 1e+06 is above 1", "did you mean 1e-06?", "--allow-large-learning-rate"]),
    ("learning rate typo in a sweep", ["sweep", "--model", "{model}", "--data", "{data}", "--output", "{d}/sw2",
                                       "--prompts", PROMPTS, "--judge", "sentiment", "--learning-rate", "5e5"],
     ["--learning-rate 500000 is above 1", "did you mean 5e-05?"]),
    ("output not ours", _with("--output", "{d}/full"), [NOT_OURS, "choose another --output"]),
    ("output not ours, overwrite", _with("--output", "{d}/full", "!--overwrite"), [NOT_OURS]),
    ("output not ours, resume auto", _with("--output", "{d}/full", "--resume", "auto"), [NOT_OURS]),
    ("sweep output not ours", ["sweep", "--model", "{model}", "--data", "{data}", "--output", "{d}/full",
                               "--overwrite", "--prompts", PROMPTS, "--judge", "sentiment"], [NOT_OURS]),
    ("online output not ours", ["online", "--model", "{model}", "--output", "{d}/full", "--overwrite", "--prompts",
                                PROMPTS, "--judge", "sentiment"], [NOT_OURS]),
    ("train output under /proc", _with("--output", PROC + "/run"), [f"--output {PROC}/run: cannot be created"]),
    ("reference cache under /proc", _with("--reference-cache", PROC), [f"--reference-cache {PROC}: cannot be created"]),
    ("plot under /proc", ["data", "inspect", "{data}", "--plot", PROC + ".png"],
     [f"--plot {PROC}.png: cannot be created"]),
    ("export under /proc", ["export", "{model}", "--output", PROC], [f"export: --output {PROC}: cannot be created"]),
    ("sample output under /proc", ["sample", "--model", "{model}", "--prompt", "hi", "--output", PROC, *SMALL],
     [f"--output {PROC}: cannot be created"]),
    ("evaluate output under /proc", ["evaluate", "--model", "{model}", "--reference-model", "{model}", "--data",
                                     "{data}", "--output", PROC], [f"--output {PROC}: cannot be created"]),
    ("sweep output under /proc", ["sweep", "--model", "{model}", "--data", "{data}", "--output", PROC, "--prompts",
                                  PROMPTS, "--judge", "sentiment"], [f"--output {PROC}: cannot be created"]),
    ("online output under /proc", ["online", "--model", "{model}", "--output", PROC, "--prompts", PROMPTS,
                                   "--judge", "sentiment"], [f"--output {PROC}: cannot be created"]),
    ("demo output under /proc", ["demo", "--quick", "--output", PROC], [f"--output {PROC}: cannot be created"]),
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
