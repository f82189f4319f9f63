"""The schedule file: equals torch's OneCycleLR, round-trips, refuses another run, never crashes past the end."""
import pytest
import torch

from helpers.schedule import OneCycleSpec, Schedule, ScheduleMismatch, limited_steps

SPEC = OneCycleSpec(max_lr=1e-3, epochs=3, steps_per_epoch=7, batch_size=16, dataset_length=112,
                    pct_start=0.2, div_factor=100, final_div_factor=100, anneal_strategy="linear")


def torch_one_cycle(spec: OneCycleSpec) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=spec.max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.max_lr, epochs=spec.epochs, steps_per_epoch=spec.steps_per_epoch,
        pct_start=spec.pct_start, div_factor=spec.div_factor, final_div_factor=spec.final_div_factor,
        anneal_strategy=spec.anneal_strategy, three_phase=spec.three_phase)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(spec.total_steps - 1):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("anneal,three_phase", [("linear", False), ("cos", False), ("cos", True)])
def test_values_equal_torch_one_cycle_lr(anneal, three_phase):
    spec = OneCycleSpec(**{**SPEC.__dict__, "anneal_strategy": anneal, "three_phase": three_phase})
    assert Schedule.compute(spec).lrs == pytest.approx(torch_one_cycle(spec), rel=1e-12)


def test_file_round_trips_with_its_header(tmp_path):
    s = Schedule.compute(SPEC)
    path = s.write(tmp_path / "schedule.txt")
    text = path.read_text().splitlines()
    assert "# batch_size: 16" in text and "# dataset_length: 112" in text and "# max_lr: 0.001" in text
    assert len([line for line in text if not line.startswith("#")]) == SPEC.total_steps
    back = Schedule.read(path)
    assert back.spec == SPEC
    assert back.lrs == pytest.approx(s.lrs, rel=1e-9)


def test_a_mismatched_batch_size_is_refused_naming_both_values(tmp_path):
    s = Schedule.read(Schedule.compute(SPEC).write(tmp_path / "schedule.txt"))
    with pytest.raises(ScheduleMismatch, match=r"batch size 16, this run has batch size 32.*--batch-size 16"):
        s.check_matches(batch_size=32, steps_per_epoch=7)
    with pytest.raises(ScheduleMismatch, match=r"7 steps per epoch, this run has 9.*--limit-train-batches"):
        s.check_matches(batch_size=16, steps_per_epoch=9)
    s.check_matches(batch_size=16, steps_per_epoch=7)


@pytest.mark.parametrize("key,value", [("epochs", 4), ("max_lr", 5e-3), ("pct_start", 0.3), ("div_factor", 25.0),
                                       ("final_div_factor", 1e4), ("anneal_strategy", "cos"), ("three_phase", True)])
def test_a_resume_with_another_one_cycle_setting_is_refused_naming_it_and_the_flag(tmp_path, key, value):
    s = Schedule.read(Schedule.compute(SPEC).write(tmp_path / "schedule.txt"))
    saved = getattr(s.spec, key)
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ScheduleMismatch, match=rf"computed for {key} {saved}, this run asks {value}: rerun with {flag}"):
        s.check_matches(16, 7, tmp_path / "schedule.txt", **{key: value})
    s.check_matches(16, 7, **{key: saved})


def test_a_max_lr_chosen_by_the_range_test_is_kept_on_resume_not_compared_with_the_config(tmp_path):
    spec = OneCycleSpec(**{**SPEC.__dict__, "max_lr": 2.01e-3, "max_lr_source": "given"})
    s = Schedule.read(Schedule.compute(spec).write(tmp_path / "schedule.txt"))
    assert s.spec.max_lr_source == "given"
    s.check_matches(16, 7, max_lr=1e-3, epochs=3)  # the config's default max LR: not the file's, accepted
    with pytest.raises(ScheduleMismatch, match="epochs"):
        s.check_matches(16, 7, max_lr=1e-3, epochs=4)


def test_limit_train_batches_counts_in_the_steps_per_epoch_as_lightning_counts_it():
    assert limited_steps(100, None) == limited_steps(100, 1.0) == 100
    assert limited_steps(100, 10) == 10 and limited_steps(5, 10) == 5
    assert limited_steps(100, 0.25) == 25 and limited_steps(10, 0.15) == 1


def test_stepping_past_the_end_holds_the_last_value_instead_of_crashing():
    s = Schedule.compute(SPEC)
    assert s.lr_at(SPEC.total_steps + 100) == s.lrs[-1]


def test_a_truncated_file_is_refused(tmp_path):
    path = Schedule.compute(SPEC).write(tmp_path / "schedule.txt")
    path.write_text("\n".join(path.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(ValueError, match="truncated"):
        Schedule.read(path)


def test_a_different_schedule_is_never_written_over_an_existing_file(tmp_path):
    path = Schedule.compute(SPEC).write(tmp_path / "schedule.txt")
    before = path.read_bytes()
    other = OneCycleSpec(**{**SPEC.__dict__, "max_lr": 5e-3})
    with pytest.raises(FileExistsError):
        Schedule.compute(other).write(path)
    assert path.read_bytes() == before
    Schedule.compute(SPEC).write(path)  # the same schedule again is fine (a rerun of the notebook cell)


def test_a_schedule_too_short_for_its_warm_up_is_refused_clearly():
    spec = OneCycleSpec(max_lr=1e-3, epochs=2, steps_per_epoch=4, batch_size=4, dataset_length=16,
                        pct_start=5 / 40)  # a 1-step warm-up: torch's OneCycleLR divides by zero
    with pytest.raises(ValueError, match="warm-up phase has 1.0 steps"):
        Schedule.compute(spec)


def stepped(schedule: Schedule, steps: int, state: dict | None = None):
    """An Adam with two parameter groups under ScheduleFileLR (restored from `state` if given), the LR
    of each group at each of `steps` optimizer steps, and the scheduler."""
    from helpers.schedule import ScheduleFileLR

    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=schedule.lr_at(0))
    sched = ScheduleFileLR(opt, schedule)
    if state is not None:
        sched.load_state_dict(state)
        for group in opt.param_groups:  # what the restored optimizer state holds (saved after the step)
            group["lr"] = schedule.lr_at(state["last_epoch"])
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs, sched


def test_the_scheduler_runs_step_k_at_line_k_of_the_file_in_every_group_and_holds_past_the_end():
    schedule = Schedule.compute(SPEC)
    lrs, _ = stepped(schedule, SPEC.total_steps + 3)
    assert [group[0] for group in lrs] == schedule.lrs + [schedule.lrs[-1]] * 3  # exactly the file's values
    assert all(a == b for a, b in lrs)


def test_the_scheduler_saves_its_position_only_and_resumes_on_the_same_line(tmp_path):
    schedule = Schedule.compute(SPEC)
    whole, _ = stepped(schedule, SPEC.total_steps)
    _, first = stepped(schedule, 9)
    state = first.state_dict()
    assert "schedule" not in state and state["last_epoch"] == 9
    torch.save(state, tmp_path / "state.pt")  # plain types: readable with weights_only=True
    rest, _ = stepped(schedule, SPEC.total_steps - 9, torch.load(tmp_path / "state.pt", weights_only=True))
    assert rest == whole[9:]


def test_a_spec_given_no_one_cycle_settings_takes_the_configs_defaults():
    from helpers.config import TrainConfig
    from helpers.schedule import one_cycle_settings

    spec = OneCycleSpec(max_lr=1e-3, epochs=40, steps_per_epoch=10, batch_size=16, dataset_length=160)
    assert {k: getattr(spec, k) for k in one_cycle_settings(TrainConfig())} == one_cycle_settings(TrainConfig())
