"""`formwork validate`: one broken script per error class, each named by file, line and step."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from worker.cli import main
from worker.contract import BrowserJob, JobStatus
from worker.executor import Runtime, run_job
from worker.script import ScriptStore

from .conftest import CREDIT_INPUTS, SCRIPTS, SELECTORS, Site


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A scripts/ + selectors/ tree with the real scripts (which validate), to break."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    return tmp_path


def validate(
    tree: Path, capsys: pytest.CaptureFixture[str], *, browser: bool = False
) -> tuple[int, str]:
    """`formwork validate` on `tree`; the checks made in Chromium only when `browser` (they
    have tests of their own, and launching a browser for every case would be slow)."""
    args = ["validate", "--scripts-dir", str(tree / "scripts")]
    args += ["--selectors-dir", str(tree / "selectors")]
    code = main(args if browser else [*args, "--no-browser"])
    return code, capsys.readouterr().out


def script(name: str, step: str, *, inputs: str = "", extra: str = "") -> str:
    """A billing script whose step under test is on line 9 (line 8 uses `account_id`); it
    declares the secret only when it uses it (a secret no step uses does not load)."""
    secrets = "[billing_password]" if "secrets." in step + extra else "[]"
    return (
        textwrap.dedent(f"""\
            name: billing/{name}
            version: 1
            site: billing
            secrets: {secrets}
            inputs:
              account_id: {{type: string}}
            steps:
              - {{id: open, goto: "/accounts/{{{{ inputs.account_id }}}}"}}
            """)
        + f"  {step}\n"
        + extra
    ).replace("inputs:\n", "inputs:\n" + inputs, 1)


SECRET = "{{ secrets.billing_password }}"

CASES = {
    # name: (the step on line 9, what the message says)
    "does_not_load": ("- {id: go, clik: credit.review}", "a step needs exactly one action"),
    "missing_target": (
        "- {id: go, click: credit.nonexistent}",
        "target 'credit.nonexistent' is not in selectors/billing.yaml",
    ),
    "subflow_missing": (
        "- {id: go, use: billing/no_such_flow}",
        "no script 'billing/no_such_flow'",
    ),
    "input_undeclared": (
        '- {id: go, fill: {target: credit.amount, value: "{{ inputs.amount }}"}}',
        "'{{ inputs.amount }}' is not a declared input",
    ),
    "commit_without_probe": (
        "- {id: go, click: confirm.submit, commit: true}",
        "commit step without a probe",
    ),
    "secret_in_goto": (f'- {{id: go, goto: "/search?q={SECRET}"}}', "flows into a goto URL"),
    "secret_in_expect": (
        f'- {{id: go, expect: {{text: {{target: confirm.amount, contains: "{SECRET}"}}}}}}',
        "flows into an expected text",
    ),
    "secret_in_select": (
        f'- {{id: go, select: {{target: credit.reason, value: "{SECRET}"}}}}',
        "flows into a select value",
    ),
    "secret_mixed": (
        f'- {{id: go, fill: {{target: login.password, value: "pw-{SECRET}"}}}}',
        "is mixed into other text in the fill value",
    ),
    "secret_into_plain_field": (
        f'- {{id: go, fill: {{target: credit.reason, value: "{SECRET}"}}}}',
        "is typed into 'credit.reason', which is not in secret_elements of selectors/billing.yaml",
    ),
    "secret_input_in_goto": (
        '- {id: go, goto: "/accounts?pin={{ inputs.pin }}"}',
        "'{{ inputs.pin }}' flows into a goto URL",
    ),
    "secret_into_plain_subflow_input": (
        f'- {{id: go, use: billing/typer, with: {{text: "{SECRET}"}}}}',
        "with: text: '{{ secrets.billing_password }}' flows into billing/typer's input 'text'",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_error_class_names_file_line_and_step(
    tree: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    step, says = CASES[name]
    inputs = "  pin: {type: string, secret: true}\n" if name == "secret_input_in_goto" else ""
    (tree / "scripts" / "billing" / f"{name}.yaml").write_text(script(name, step, inputs=inputs))
    # A sub-flow whose input is an ordinary one (not `secret: true`).
    (tree / "scripts" / "billing" / "typer.yaml").write_text(
        "name: billing/typer\nversion: 1\nsite: billing\ninputs: {text: {type: string}}\n"
        'steps:\n  - {id: type, fill: {target: credit.reason, value: "{{ inputs.text }}"}}\n'
    )
    code, out = validate(tree, capsys)
    assert code == 1
    failed = out.split(f"FAIL  {tree / 'scripts' / 'billing' / name}.yaml\n", 1)[1]
    message = failed.split("\nFAIL", 1)[0].split("\n")[0]
    line = 10 if name == "secret_input_in_goto" else 9
    assert f"{name}.yaml:{line}: steps[1] (step 'go')" in message, message
    assert says in message, message
    assert "1 invalid" in out and "ok    billing/issue_credit@1" in out


def test_an_input_declared_and_never_used_is_named_with_its_line(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = script("unused", "- {id: go, click: credit.review}", inputs="  reference: {}\n")
    (tree / "scripts" / "billing" / "unused.yaml").write_text(body)
    code, out = validate(tree, capsys)
    assert code == 1
    assert (
        "unused.yaml:6: inputs > reference: input 'reference' is declared but no step uses it"
        in out
    )


def test_a_secret_in_the_effect_is_refused(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = script(
        "effect_leak", "- {id: go, click: credit.review}", extra=f'effect: "done {SECRET}"\n'
    )
    (tree / "scripts" / "billing" / "effect_leak.yaml").write_text(body)
    code, out = validate(tree, capsys)
    assert code == 1
    assert (
        "effect_leak.yaml:10: effect: '{{ secrets.billing_password }}' flows into the effect" in out
    )


def test_secrets_reach_secret_fields_whole_and_through_secret_subflow_inputs(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tree / "scripts" / "billing" / "typer.yaml").write_text(
        "name: billing/typer\nversion: 1\nsite: billing\n"
        "inputs: {text: {type: string, secret: true}}\n"
        'steps:\n  - {id: type, fill: {target: login.password, value: "{{ inputs.text }}"}}\n'
    )
    step = f'- {{id: go, use: billing/typer, with: {{text: "{SECRET}"}}}}'
    (tree / "scripts" / "billing" / "fine.yaml").write_text(script("fine", step))
    code, out = validate(tree, capsys)
    assert code == 0, out
    assert "ok    billing/fine@1" in out and "0 invalid" in out


def test_versions_side_by_side_must_agree_with_their_file_names(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = (tree / "scripts" / "billing" / "issue_credit.yaml").read_text()
    (tree / "scripts" / "billing" / "issue_credit@2.yaml").write_text(
        source.replace("version: 1", "version: 2")
    )
    code, out = validate(tree, capsys)
    assert code == 0, out
    assert "ok    billing/issue_credit@2" in out
    (tree / "scripts" / "billing" / "issue_credit@3.yaml").write_text(
        source.replace("version: 1", "version: 2")
    )
    code, out = validate(tree, capsys)
    assert code == 1
    assert "issue_credit@3.yaml:3: version: is 2, but the file is named @3" in out
    # Only the misnamed file fails: the versions beside it are not blamed for it.
    assert "ok    billing/issue_credit@1" in out and "ok    billing/issue_credit@2" in out


def test_a_rollout_file_must_name_versions_that_exist(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rollout = tree / "scripts" / "billing" / "issue_credit.rollout.yaml"
    rollout.write_text("stable: 1\ncanary: 9\npercent: 10\n")
    code, out = validate(tree, capsys)
    assert code == 1
    assert "canary: billing/issue_credit has no version 9 (available: 1)" in out
    rollout.write_text("stable: 1\npercent: 10\nmargin: 2\n")
    code, out = validate(tree, capsys)
    assert code == 1
    assert "issue_credit.rollout.yaml:3: margin: Input should be less than or equal to 1" in out


def test_a_rollout_fails_when_a_version_it_routes_to_does_not_load(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = (tree / "scripts" / "billing" / "issue_credit.yaml").read_text()
    broken = source.replace("version: 1", "version: 2").replace("click: confirm.submit", "clik: x")
    (tree / "scripts" / "billing" / "issue_credit@2.yaml").write_text(broken)
    rollout = tree / "scripts" / "billing" / "issue_credit.rollout.yaml"
    rollout.write_text("stable: 1\ncanary: 2\npercent: 10\n")
    code, out = validate(tree, capsys)
    assert code == 1
    assert "FAIL  " + str(rollout) in out
    assert "canary v2 does not load" in out and "clik: unknown key (did you mean 'click'?)" in out


def test_a_missing_or_empty_scripts_directory_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped path used to print `0 valid, 0 invalid` and exit 0: a green CI gate.
    scripts = tmp_path / "scripts"
    assert main(["validate", "--scripts-dir", str(scripts)]) == 2
    assert f"formwork: no scripts directory {scripts}\n" == capsys.readouterr().err
    scripts.mkdir()
    assert main(["validate", "--scripts-dir", str(scripts)]) == 2
    assert f"formwork: no scripts under {scripts}" in capsys.readouterr().err


def test_yaml_files_the_loader_never_reads_are_reported(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripts = tree / "scripts"
    shutil.copy(scripts / "billing" / "login.yaml", scripts / "billing" / "other.yml")
    (scripts / "stray.yaml").write_text((scripts / "billing" / "login.yaml").read_text())
    code, out = validate(tree, capsys)
    assert code == 1
    assert (
        f"FAIL  {scripts}/billing/other.yml\n      {scripts}/billing/other.yml: not read: " in out
    )
    assert "the extension must be .yaml (other.yaml)" in out
    assert f"{scripts}/stray.yaml: not read: scripts are {scripts}/<site>/<name>.yaml" in out
    assert "2 invalid" in out


async def test_a_rollout_file_named_for_a_version_is_not_read_and_fails_no_job(
    tree: Path, runtime: Runtime, billing: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    # `issue_credit@2.rollout.yaml` matched the glob of the script's versions: every job of
    # billing/issue_credit was rejected (script_invalid, 'name' is required…), while validate
    # said `ok billing/issue_credit@1` and blamed the real rollout file for the stray one.
    scripts = tree / "scripts"
    stray = scripts / "billing" / "issue_credit@2.rollout.yaml"
    stray.write_text("stable: 1\n")
    code, out = await asyncio.to_thread(validate, tree, capsys)
    assert code == 1 and "1 invalid" in out
    assert (
        f"FAIL  {stray}\n      {stray}: not read: scripts are {scripts}/<site>/<name>.yaml; "
        "a rollout file is one per script, issue_credit.rollout.yaml, whose stable: and "
        "canary: name the versions\n"
    ) in out
    assert "ok    billing/issue_credit rollout: stable v1" in out

    store = ScriptStore(scripts, tree / "selectors")
    job = BrowserJob(job_id="stray-rollout", script="billing/issue_credit",
                     inputs=CREDIT_INPUTS, site_url=billing.url)  # fmt: skip
    report = await run_job(job, replace(runtime, scripts=store))
    assert report.status == JobStatus.succeeded, report.error
    assert report.script_version == 1 and len(billing.credits()) == 1


def test_an_error_is_printed_once_under_the_file_it_is_in(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    billing = tree / "scripts" / "billing"
    source = (billing / "issue_credit.yaml").read_text()
    (billing / "issue_credit@2.yaml").write_text(source.replace("version: 1\n", ""))
    code, out = validate(tree, capsys)
    assert code == 1
    assert out.count("'version' is required") == 1, out
    assert "Field required" not in out
    assert (
        f"FAIL  {billing}/issue_credit.rollout.yaml\n      {billing}/issue_credit@2.yaml is invalid"
        in out
    )


def test_a_rollout_file_for_a_sub_flow_is_refused(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rollout = tree / "scripts" / "billing" / "login.rollout.yaml"
    rollout.write_text("stable: 1\n")
    code, out = validate(tree, capsys)
    assert code == 1
    assert f"{rollout}: billing/login is a sub-flow (used by billing/issue_credit)" in out
    assert "never the rollout's" in out


def test_a_broken_registry_has_its_own_entry_and_its_scripts_point_to_it(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tree / "selectors" / "orders.yaml"
    source = registry.read_text().replace("\nelements:\n", "\nelements:\n  Bad-Name: []\n", 1)
    registry.write_text(source)
    code, out = validate(tree, capsys)
    assert code == 1
    assert f"FAIL  {registry}\n      {registry}:" in out
    assert out.count("element name 'Bad-Name' must be dotted lower_case words") == 1
    assert f"{registry} is invalid (see its own FAIL entry)" in out  # orders' scripts
    assert f"ok    {tree / 'selectors' / 'billing.yaml'}  (" in out


def test_a_registry_whose_login_flow_is_missing_fails_on_its_own_line(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tree / "selectors" / "orders.yaml"
    registry.write_text(
        registry.read_text().replace("login_flow: orders/login", "login_flow: orders/signin")
    )
    code, out = validate(tree, capsys)
    assert code == 1
    # The registry is at fault (it said "ok" while every orders script failed naming it).
    assert f"FAIL  {registry}\n      {registry}:6: login_flow: no script 'orders/signin'" in out
    assert f"{registry} is invalid (see its own FAIL entry)" in out  # orders' scripts


def test_a_chromium_that_does_not_start_fails_the_gate(
    tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mistyped FORMWORK_CHROMIUM in CI must not pass with the browser's checks skipped.
    monkeypatch.setenv("FORMWORK_CHROMIUM", str(tree / "no-such-chromium"))
    code, out = validate(tree, capsys, browser=True)
    assert code == 1
    assert f"FAIL  {tree / 'no-such-chromium'}\n      Chromium did not start (" in out
    assert "were not checked in a browser; --no-browser skips this check" in out


def test_selectors_and_keys_only_a_browser_can_judge_are_checked_in_chromium(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each would load, pass every check Python can make, and stop the first job reaching it.
    registry = tree / "selectors" / "billing.yaml"
    source = registry.read_text()
    source = source.replace('{css: "#confirmation-number"}', '{css: "#confirmation-number[["}')
    source = source.replace('[{css: "#confirmation-date"}]', '[{css: "x", frame: "iframe[["}]')
    source = source.replace('error_banner: [".alert-danger"', 'error_banner: [".alert-danger>>>"')
    registry.write_text(source)
    credit = tree / "scripts" / "billing" / "issue_credit.yaml"
    credit.write_text(
        credit.read_text().replace(
            "  - {id: confirm_amount,",
            "  - {id: tab_out, press: {key: Entr, target: credit.reference}}\n"
            "  - {id: next_field, press: {key: Tab}}\n"
            "  - {id: confirm_amount,",
        )
    )
    code, out = validate(tree, capsys, browser=True)
    assert code == 1
    assert f"{registry}:41: elements > credit.confirmation_number[0] > css: " in out
    assert "'#confirmation-number[[' is not a valid selector: Unexpected token" in out
    assert f"{registry}:42: elements > credit.confirmation_date[0] > frame: 'iframe[['" in out
    assert f"{registry}:48: detectors > error_banner[0]: '.alert-danger>>>' is not valid CSS" in out
    assert (
        f"{credit}:22: steps[7] (step 'tab_out') > press > key: 'Entr' is not a key Playwright "
        "knows" in out
    )
    assert "'Tab'" not in out  # a real key passes
    assert "2 invalid" in out
    # The real tree passes, and the same broken tree passes without the browser's checks.
    code, out = validate(tree, capsys)
    assert code == 0, out


def test_an_unknown_top_level_key_is_named_on_its_own_line(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `input:` for `inputs:`: its fields are on the lines below, the typo is on this one.
    typo = tree / "scripts" / "billing" / "typo.yaml"
    typo.write_text(
        "name: billing/typo\nversion: 1\nsite: billing\n"
        "input:\n  account_id: {type: string}\n"
        'steps:\n  - {id: go, goto: "/accounts/x"}\n'
    )
    code, out = validate(tree, capsys)
    assert code == 1
    assert f"{typo}:4: input: unknown key (did you mean 'inputs'?)" in out


def test_an_input_default_that_is_not_of_its_type_fails_validate(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = '  d: {type: bool, default: maybe}\n  n: {type: int, default: "abc"}\n'
    step = '- {id: go, goto: "/accounts/{{ inputs.d }}{{ inputs.n }}"}'
    path = tree / "scripts" / "billing" / "defaults.yaml"
    path.write_text(script("defaults", step, inputs=inputs))
    code, out = validate(tree, capsys)
    assert code == 1
    assert f"{path}:6: inputs > d > default: 'maybe' is not a valid bool default" in out
    assert f"{path}:7: inputs > n > default: 'abc' is not a valid int default" in out


def test_a_dynamic_element_not_in_the_registry_is_named_with_its_line(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = script(
        "dyn",
        "- {id: go, click: credit.review}",
        extra="dynamic: [credit.confirmation_date,\n          credit.nope]\n",
    )
    path = tree / "scripts" / "billing" / "dyn.yaml"
    path.write_text(body)
    code, out = validate(tree, capsys)
    assert code == 1
    assert f"{path}:11: dynamic[1]: 'credit.nope' is not in selectors/billing.yaml" in out


def test_redact_selectors_are_checked_in_chromium(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The blur skips a selector the browser cannot parse: a typo turned it off without a word.
    credit = tree / "scripts" / "billing" / "issue_credit.yaml"
    credit.write_text(credit.read_text() + 'redact: ["#account-name",\n  "div[[["]\n')
    lines = credit.read_text().splitlines()
    line = lines.index('  "div[[["]') + 1
    code, out = validate(tree, capsys, browser=True)
    assert code == 1
    assert f"{credit}:{line}: redact[1]: 'div[[[' is not valid CSS" in out
    assert "'#account-name'" not in out  # a real selector passes
    assert "1 invalid" in out
