"""Hyperparameter search (`hparams_search=...`, hydra_plugins/kd_sweeper.py): Hydra's sweep syntax as Optuna
distributions, every preset composing, a tiny real search through the basic launcher whose trials are ordinary run
folders scored by validation accuracy, a relaunch that continues a study whose sweeping process was killed without
retraining a finished trial, and the refusals of a search that cannot run as configured."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import CONF, ROOT, TINY, compose_config, run_train, train_command, train_env
from kd.config_groups import options

optuna = pytest.importorskip("optuna", reason="the search needs the tune extra: pip install -e '.[tune]'")
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402

from hydra_plugins.kd_sweeper import JOURNAL, checksummed_journal, distribution  # noqa: E402

PRESETS = options("hparams_search")


def parsed(line):
    return distribution(OverridesParser.create().parse_overrides([line])[0])


def test_sweep_syntax_becomes_optuna_distributions():
    assert parsed("a=interval(0.1, 0.9)") == FloatDistribution(0.1, 0.9)
    assert parsed("a=tag(log, interval(1, 16))") == FloatDistribution(1.0, 16.0, log=True)
    assert parsed("a=tag(int, interval(2, 8))") == IntDistribution(2, 8)
    assert parsed("a=choice(1.0, 2.0, 4.0)") == CategoricalDistribution([1.0, 2.0, 4.0])
    assert parsed("a=1,2,3") == CategoricalDistribution([1, 2, 3])
    assert parsed("a=range(2, 8, 3)") == CategoricalDistribution([2, 5])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_searches_keys_of_its_own_method(preset):
    from omegaconf import OmegaConf

    cfg = compose_config([f"hparams_search={preset}"])
    sweeper = OmegaConf.load(CONF / "hparams_search" / f"{preset}.yaml").hydra.sweeper
    assert cfg.method.name == sweeper.method and sweeper.study_name == preset
    for key, expression in sweeper.params.items():
        assert OmegaConf.select(cfg, key) is not None, key
        parsed(f"{key}={expression}")  # valid sweep syntax


def test_a_preset_fixes_the_sweep_folder_so_the_same_command_finds_its_study(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        search = compose(config_name="config", overrides=["hparams_search=kd_tpe"], return_hydra_config=True)
        plain = compose(config_name="config", return_hydra_config=True)
    assert search.hydra.sweep.dir == str(tmp_path / "multirun/search/kd_tpe")  # under paths.root ($KD_ROOT here)
    assert search.hydra.sweeper._target_ == "hydra_plugins.kd_sweeper.KDOptunaSweeper"
    multirun = str(tmp_path / "multirun") + "/"
    assert plain.hydra.sweep.dir.startswith(multirun) and not plain.hydra.sweep.dir.startswith(multirun + "search")
    assert plain.hydra.runtime.choices["hydra/job_logging"] == "kd" == search.hydra.runtime.choices["hydra/job_logging"]


# ---------------------------------------------------------------- tiny real searches

def search_args(folder, ckpts, *extra):
    return [*TINY, "data.source.num_train=200", "data.source.num_test=100", "kd_epochs=1",
            "model@model.teacher=resnet20", f"model.teacher.ckpt={ckpts['resnet20']}", "hparams_search=kd_tpe",
            "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={folder}", *extra]


def study_of(folder):
    storage = JournalStorage(checksummed_journal(folder / JOURNAL))
    return optuna.load_study(study_name="kd_tpe", storage=storage)


def trials_by_number(folder):
    return {t.number: t for t in study_of(folder).get_trials()}


def check_trials_are_run_folders(folder):
    """Each trial finished in its own folder `<number>_kd`, scored by that run's validation accuracy, with the
    hyperparameters Optuna chose for it; no other folder."""
    trials = trials_by_number(folder)
    assert sorted(trials) == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials.values())
    assert sorted(p.name for p in folder.iterdir() if (p / ".hydra").is_dir()) == ["0_kd", "1_kd", "2_kd"]
    from omegaconf import OmegaConf
    for number, trial in trials.items():
        run = folder / f"{number}_kd"
        results = json.loads((run / "results.json").read_text())
        assert trial.value == results["val_acc"]
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert config.method.loss.temperature == trial.params["method.loss.temperature"]
        assert config.method.loss.alpha == trial.params["method.loss.alpha"]
        assert 1.0 <= trial.params["method.loss.temperature"] <= 16.0
        assert 0.1 <= trial.params["method.loss.alpha"] <= 0.95
    return trials


@pytest.fixture(scope="module")
def search(tmp_path_factory, random_teacher_ckpts):
    root = tmp_path_factory.mktemp("search")
    args = search_args(root / "study", random_teacher_ckpts, "hydra.sweeper.n_jobs=2")
    proc = run_train(["-m", *args], cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "study", args, proc


@pytest.mark.slow
def test_a_tiny_search_records_every_trial_as_a_run_folder(search):
    folder, _, proc = search
    trials = check_trials_are_run_folders(folder)
    from omegaconf import OmegaConf
    best = OmegaConf.load(folder / "best.yaml")
    top = max(trials.values(), key=lambda t: t.value)
    assert best.best.value == top.value and best.trials.complete == 3
    assert "Launching 2 jobs" in proc.stderr + proc.stdout  # n_jobs trials per batch


@pytest.mark.slow
def test_the_report_works_on_a_search_unchanged(search):
    import pandas as pd

    folder, _, _ = search
    proc = subprocess.run([sys.executable, "-m", "kd.report", str(folder), "--latency-repeats", "0"], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, best = pd.read_csv(folder / "summary.csv"), pd.read_csv(folder / "best.csv")
    trials = trials_by_number(folder)
    top = max(trials.values(), key=lambda t: t.value)
    assert list(summary.status) == ["ok"] * 4 and (best.configurations[0], best.val_acc[0]) == (3, top.value)
    row = summary[summary.job.str.startswith(f"{top.number}_")].iloc[0]
    assert best.test_acc[0] == pytest.approx(row.test_acc)  # the chosen trial's test accuracy, reported
    assert (folder / "report_plots" / "search_kd.png").is_file()
    assert "(report_plots/search_kd.png)" in (folder / "report.md").read_text()


@pytest.mark.slow
def test_relaunching_a_finished_search_trains_nothing(search):
    folder, args, _ = search
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/results.json")}
    proc = run_train(["-m", *args], cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 3 trials done" in proc.stderr + proc.stdout and "Launching" not in proc.stderr + proc.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/results.json")} == before


@pytest.mark.slow
def test_a_killed_search_continues_without_retraining_finished_trials(tmp_path, random_teacher_ckpts):
    folder = tmp_path / "study"
    args = ["-m", *search_args(folder, random_teacher_ckpts, "hydra.sweeper.n_jobs=1")]
    first = folder / "0_kd" / "results.json"
    proc = subprocess.Popen(train_command(args), cwd=tmp_path, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "the first trial never finished"
        proc.send_signal(signal.SIGKILL)  # the sweeping process, mid-search: no chance to clean up
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = first.read_bytes()
    relaunch = run_train(args, cwd=tmp_path)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    check_trials_are_run_folders(folder)
    assert first.read_bytes() == kept  # the finished trial was not trained again
    params = [tuple(sorted(t.params.items())) for t in trials_by_number(folder).values()]
    assert len(set(params)) == 3  # the continued sampler does not draw the first launch's trials again
    log = (folder / "0_kd" / "train.log").read_text()
    assert log.count("epoch   1/1") == 1


@pytest.mark.slow
def test_a_trial_left_half_sampled_by_a_killed_sweeper_is_sampled_to_the_end_and_run(tmp_path, random_teacher_ckpts):
    folder = tmp_path / "study"
    args = ["-m", *search_args(folder, random_teacher_ckpts, "hydra.sweeper.n_jobs=1")]
    first = run_train([a.replace("n_trials=3", "n_trials=1") for a in args], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # what Optuna's journal holds when the sweeper dies between sampling a trial's first and second parameter
    half = study_of(folder).ask({"method.loss.temperature": FloatDistribution(1.0, 16.0, log=True)})
    temperature = half.params["method.loss.temperature"]
    relaunch = run_train([a.replace("n_trials=3", "n_trials=2") for a in args], cwd=tmp_path)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert "trial 1: its sweeping process died while Optuna sampled it; sampled the rest (method.loss.alpha)" in \
        relaunch.stderr + relaunch.stdout
    trials = trials_by_number(folder)
    assert sorted(trials) == [0, 1] and all(t.state.name == "COMPLETE" for t in trials.values())
    assert trials[1].params["method.loss.temperature"] == temperature
    assert 0.1 <= trials[1].params["method.loss.alpha"] <= 0.95
    results = json.loads((folder / "1_kd" / "results.json").read_text())
    assert trials[1].value == results["val_acc"]


# ---------------------------------------------------------------- refusals

@pytest.mark.slow
def test_a_misspelt_search_key_or_another_method_is_refused_before_training(tmp_path, random_teacher_ckpts):
    proc = run_train(["-m", *search_args(tmp_path / "a", random_teacher_ckpts, "method.loss.temprature=interval(1,4)")],
                     cwd=tmp_path)
    assert proc.returncode != 0 and "search key method.loss.temprature is not in the composed config" in proc.stderr
    assert "'temperature'" in proc.stderr and not (tmp_path / "a" / "0_kd").exists()
    proc = run_train(["-m", *search_args(tmp_path / "b", random_teacher_ckpts, "method=dkd")], cwd=tmp_path)
    assert proc.returncode != 0 and "searches method=kd's hyperparameters, but the launch has method=dkd" in proc.stderr


@pytest.mark.slow
def test_continuing_a_study_with_another_config_is_refused(search, tmp_path):
    folder, args, _ = search
    proc = run_train(["-m", *[a for a in args if a != "kd_epochs=1"], "kd_epochs=2"], cwd=folder.parent)
    assert proc.returncode != 0
    assert "holds study 'kd_tpe' of another search" in proc.stderr and "kd_epochs: 1 there, 2 now" in proc.stderr
    assert len(trials_by_number(folder)) == 3


def test_the_ci_installs_the_tune_extra():
    assert ".[test,tune" in (ROOT / ".ci" / "run").read_text()


def test_a_damaged_journal_entry_stops_the_search_naming_it(tmp_path):
    journal = tmp_path / JOURNAL
    study = optuna.create_study(storage=JournalStorage(checksummed_journal(journal)), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert len(optuna.load_study(storage=JournalStorage(checksummed_journal(journal)), study_name="s").trials) == 3
    lines = journal.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if '"values"' in line)  # a trial's recorded value
    lines[number] = re.sub(r"(\d)(\d)", lambda m: m[1] + str((int(m[2]) + 1) % 10), lines[number], count=1)
    journal.write_text("\n".join(lines) + "\n")
    # ValueError: Hydra's plugin scan may load a second copy of the sweeper module, with a SearchError of its own
    with pytest.raises(ValueError, match=rf"entry {number + 1} does not match the checksum written with it"):
        optuna.load_study(storage=JournalStorage(checksummed_journal(journal)), study_name="s")


def test_a_journal_from_before_checksums_is_continued(tmp_path):
    journal = tmp_path / JOURNAL
    plain = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(journal))), study_name="s")
    plain.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    study = optuna.load_study(storage=JournalStorage(checksummed_journal(journal)), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)  # appended with checksums
    again = optuna.load_study(storage=JournalStorage(checksummed_journal(journal)), study_name="s")
    assert [t.number for t in again.trials] == [0, 1, 2]
