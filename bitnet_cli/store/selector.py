"""Which run a RUN argument names: one rule, written once, for every command that takes RUN or
RUN|CKPT. A bare word is a run id, a unique prefix of one or 'latest', looked up in the runs
folder only; a path is taken only when written as one, and only if it is a run or checkpoint
folder. What may be changed or deleted must lie in the runs folder. No torch here."""

from __future__ import annotations

import os
from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.store.runs import CHECKPOINTS_FOLDER, CONFIG_FILE, STATE_FILE, list_run_dirs, runs_dir


def written_as_path(selector: str) -> bool:
    """The one selector rule: a RUN argument is a path only when it is written as one (./x,
    ../x, /x, ~/x, anything with a slash). Any other word is a run id, a unique prefix of one or
    'latest', looked up in the runs folder only, whatever the current directory holds."""
    slashes = {"/", os.sep, os.altsep} - {None}
    return selector in (".", "..") or selector.startswith("~") or any(s in selector for s in slashes)


def resolve_run(selector: str) -> Path:
    """A run folder from a run id, a unique prefix of one, 'latest', or a path. (The commands
    that only read a model take the newest run of an ambiguous prefix: use/loading.py.)"""
    runs = matching_runs(selector)
    if len(runs) > 1 and selector != "latest":
        raise BitnetError(f"run {selector!r} matches {len(runs)} runs "
                          f"({_listing([r.name for r in runs])}); give more of the run id "
                          "(chat, play, eval and export take the newest of them)")
    return runs[-1]


def matching_runs(selector: str) -> list[Path]:
    """The run folders a selector names, oldest first: one for an id or a path, every run for
    'latest', every run whose id starts with a prefix."""
    if not selector.strip():  # would be a prefix of every run
        raise BitnetError("the run is empty; give a run id, a unique prefix of one, 'latest', "
                          "or a path to a run folder")
    if written_as_path(selector):
        return [run_folder_at(selector)]
    runs = list_run_dirs()
    if selector == "latest":
        if not runs:
            raise BitnetError(f"there are no runs in {runs_dir()} yet; start one with "
                              f"`bitnet train`{_folder_here(selector)}")
        return runs
    names = {p.name: p for p in runs}
    if selector in names:
        return [names[selector]]
    matches = [names[name] for name in names if name.startswith(selector)]
    if matches:
        return matches
    if not names:
        raise BitnetError(f"no run {selector!r}: there are no runs in {runs_dir()} yet"
                          f"{_folder_here(selector)}")
    import difflib
    close = difflib.get_close_matches(selector, list(names), n=3, cutoff=0.5)
    hint = f"closest: {_listing(close)}" if close else f"there are: {_listing(list(names)[-3:])}"
    raise BitnetError(f"no run {selector!r} in {runs_dir()}; {hint}{_folder_here(selector)}")


def _folder_here(word: str) -> str:
    """For a word that names no run: the way to mean a folder of that name here instead."""
    if not os.path.isdir(word):
        return ""
    return f" (./{word} is a folder here, not a run: write ./{word} to mean the folder)"


def run_folder_at(written: str) -> Path:
    """The run a path names: the run's own folder, its checkpoints folder or one checkpoint in
    it, resolved. Any other folder is refused, even one beside a run."""
    path = Path(written).expanduser()
    if not path.exists():
        raise BitnetError(f"{written} does not exist")
    real = path.resolve()
    candidates = [real]
    if real.name == CHECKPOINTS_FOLDER:
        candidates.append(real.parent)
    if real.parent.name == CHECKPOINTS_FOLDER:
        candidates.append(real.parent.parent)
    for folder in candidates:
        if (folder / CONFIG_FILE).is_file():
            if not ((folder / STATE_FILE).exists() or (folder / CHECKPOINTS_FOLDER).is_dir()):
                raise BitnetError(f"{written} is not a run folder: it holds a {CONFIG_FILE} but "
                                  f"no {STATE_FILE} or {CHECKPOINTS_FOLDER}/ (an export, or "
                                  "another tool's model folder)")
            return folder
    raise BitnetError(f"{written} is not a run folder (it has no {CONFIG_FILE}) nor a "
                      "checkpoint folder of one")


def owned_run(run_dir: Path, refusal: str) -> Path:
    """`run_dir`, if it lies in the runs folder once symlinks are followed: bitnet changes,
    renames and deletes nothing outside it. Otherwise one line, where `refusal` says what to do
    instead."""
    real = Path(os.path.realpath(run_dir))
    if real.parent == Path(os.path.realpath(runs_dir())):
        return run_dir
    where = (f"{run_dir} is a link to {real}, outside" if real != Path(run_dir).absolute()
             else f"{run_dir} is outside")
    raise BitnetError(f"{where} the runs folder {runs_dir()}; {refusal}")


def run_to_resume(selector: str) -> Path:
    """The run a selector names, for resume, which writes to it."""
    run_dir = resolve_run(selector)
    return owned_run(run_dir, f"resume writes only to runs in it: move the run there first "
                              f"(mv {run_dir} {runs_dir()}/)")


WHOLE_ID = "this takes whole run ids"


def exact_run(selector: str) -> Path:
    """The run a whole run id or a run's own folder names, to delete: a prefix, 'latest' or a
    folder inside a run is refused, saying what it would have meant, and so is any folder that
    is not in the runs folder once symlinks are followed."""
    if selector == "latest":
        raise BitnetError(f"{WHOLE_ID}, and 'latest' is not one (it could mean the newest run); "
                          "`bitnet runs list` prints them")
    runs = matching_runs(selector)
    if written_as_path(selector):
        if runs[0] != Path(selector).expanduser().resolve():
            raise BitnetError(f"{selector} is not a run folder (it has no {CONFIG_FILE}); give "
                              "the run's own folder")
    elif len(runs) > 1 or runs[0].name != selector:
        raise BitnetError(f"{WHOLE_ID}, and {selector!r} is not one (it could mean "
                          f"{_listing([r.name for r in runs])}); `bitnet runs list` prints them")
    return owned_run(runs[0], "runs rm deletes only runs in it; if you mean to delete "
                              f"{runs[0]}, do it yourself (rm -r)")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def find_checkpoint(selector: str) -> tuple[Path, tuple, list[str]]:
    """The checkpoint a RUN|CKPT argument names, read back whole, and why newer ones of its
    run were skipped."""
    from bitnet_cli.store.checkpoint import MODEL_FILE, newest_loadable, read_checkpoint  # torch
    path = Path(selector).expanduser()
    # A checkpoint folder holds the weights and never a config.json (an export holds both).
    if (written_as_path(selector) and (path / MODEL_FILE).is_file()
            and not (path / CONFIG_FILE).exists()):
        return path, read_checkpoint(path, with_optimizer=False), []
    # 'latest' or a prefix: the newest run that has a checkpoint (one just started has none).
    candidates = matching_runs(selector)
    for run_dir in reversed(candidates):
        found, contents, skipped = newest_loadable(run_dir / "checkpoints", for_resume=False)
        if found is not None:
            return found, contents, skipped
    which = (f"run {candidates[0].name} has no checkpoint" if len(candidates) == 1 else
             f"none of the {len(candidates)} runs {selector!r} names has a checkpoint")
    raise BitnetError(f"{which} yet; wait for a first save or train it further")
