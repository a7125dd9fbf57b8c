"""The script DSL: good scripts load; each kind of broken script fails naming file, step, field."""

from __future__ import annotations

import shutil
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from worker.cli import main
from worker.errors import InputInvalid, ScriptInvalid, ScriptNotFound
from worker.script import ScriptStore
from worker.templating import TemplateError, references, render

from .conftest import CREDIT_INPUTS, SCRIPTS, SELECTORS, credit_as_script


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A scripts/ + selectors/ tree holding the real billing files, to add broken ones to."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    shutil.copytree(SELECTORS, tmp_path / "selectors")
    return tmp_path


def write(tree: Path, name: str, body: str) -> Path:
    path = tree / "scripts" / "billing" / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


HEADER = """\
name: billing/{name}
version: 1
site: billing
inputs:
  account_id: {{type: string}}
steps:
"""


def load_broken(tree: Path, name: str, steps: str) -> str:
    write(tree, name, HEADER.format(name=name) + textwrap.dedent(steps))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load(f"billing/{name}")
    return info.value.message


def test_issue_credit_loads_with_login_subflow_inlined(script_store: ScriptStore) -> None:
    loaded = script_store.load("billing/issue_credit")
    ids = [p.id for p in loaded.plan]
    assert ids[:4] == ["login.open", "login.username", "login.password", "login.submit"]
    assert ids[-1] == "confirmation"
    assert loaded.secret_names() == {"billing_username", "billing_password"}
    assert len(loaded.digest) == 64


def test_pinned_version_that_does_not_exist_is_not_found(script_store: ScriptStore) -> None:
    with pytest.raises(ScriptNotFound, match=r"no version 7 \(available: 1\)"):
        script_store.load("billing/issue_credit", 7)
    with pytest.raises(ScriptNotFound, match="no script 'billing/nope'"):
        script_store.load("billing/nope")


def test_unknown_action_names_file_line_and_step(tree: Path) -> None:
    message = load_broken(tree, "bad_action", "  - {id: go, clik: credit.submit}\n")
    assert "bad_action.yaml:7" in message
    assert "step 'go'" in message
    assert "exactly one action" in message


def test_missing_target_names_the_step_and_registry(tree: Path) -> None:
    message = load_broken(tree, "bad_target", "  - {id: press_it, click: credit.nonexistent}\n")
    assert "bad_target.yaml:7" in message
    assert "step 'press_it'" in message
    assert "'credit.nonexistent' is not in selectors/billing.yaml" in message
    # A misspelt element says which one it looks like.
    message = load_broken(tree, "typo_target", "  - {id: go, click: credit.reveiw}\n")
    assert message.endswith(
        "target 'credit.reveiw' is not in selectors/billing.yaml (did you mean 'credit.review'?)"
    )


def test_an_allowed_host_that_is_not_a_bare_host_names_file_line_and_value(tree: Path) -> None:
    # Each allowed host becomes a proxy bypass rule (worker.guard): a URL, a port or a wildcard
    # would not mean what it says there.
    registry = tree / "selectors" / "billing.yaml"
    text = registry.read_text()
    assert "allowed_hosts: [127.0.0.1, localhost]" in text
    registry.write_text(text.replace("[127.0.0.1, localhost]", "[127.0.0.1, 'billing:8080']"))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    message = info.value.message
    assert "billing.yaml:5" in message and "allowed_hosts" in message
    assert "'billing:8080' is not a host name or IP address" in message


def test_a_base_url_outside_the_allowed_hosts_is_refused_at_load(tree: Path) -> None:
    # Every job would be stopped at its first page (navigation_blocked).
    registry = tree / "selectors" / "billing.yaml"
    text = registry.read_text()
    registry.write_text(text.replace("http://127.0.0.1:8811", "http://evil.example:8811"))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert "billing.yaml:4: base_url: host 'evil.example' is not one of allowed_hosts" in (
        info.value.message
    )


def test_undeclared_input_is_refused(tree: Path) -> None:
    message = load_broken(
        tree,
        "bad_input",
        '  - {id: amt, fill: {target: credit.amount, value: "{{ inputs.amount }}"}}\n',
    )
    assert "step 'amt'" in message
    assert "inputs.amount" in message and "not a declared input" in message


def test_template_with_code_is_refused(tree: Path) -> None:
    message = load_broken(
        tree,
        "bad_template",
        "  - {id: amt, fill: {target: credit.amount, "
        'value: "{{ inputs.account_id.__class__ }}"}}\n',
    )
    assert "step 'amt'" in message and "bad template" in message


def test_output_used_before_it_is_extracted_is_refused(tree: Path) -> None:
    message = load_broken(
        tree, "bad_output", '  - {id: go, goto: "/credits/{{ outputs.confirmation_number }}"}\n'
    )
    assert "not extracted by an earlier step" in message


def test_field_error_names_the_field(tree: Path) -> None:
    message = load_broken(tree, "bad_field", "  - {id: amt, fill: {target: credit.amount}}\n")
    assert "bad_field.yaml:7: steps[0] (step 'amt') > fill: 'value' is required" in message
    # A misspelt action is a field of the step, not of the action beside it.
    message = load_broken(
        tree, "typo", "  - {id: r, expect: {visible: credit.amount}, klick: credit.review}\n"
    )
    assert "typo.yaml:7: steps[0] (step 'r') > klick: unknown key (did you mean 'click'?)" in (
        message
    )
    message = load_broken(tree, "no_action", "  - {id: r, fil: {target: credit.amount}}\n")
    assert "step 'r'): a step needs exactly one action: goto, fill" in message
    assert "'fil' is not an action (did you mean 'fill'?)" in message
    message = load_broken(tree, "two", "  - {id: r, goto: /, click: credit.review}\n")
    assert "a step has exactly one action; this one has goto and click" in message


def test_a_value_of_the_wrong_shape_says_what_was_expected_in_the_file_s_words(
    tree: Path,
) -> None:
    """Not pydantic's "a valid dictionary or instance of PressSpec": no script names a class."""
    message = load_broken(tree, "shape", "  - {id: k, press: Enter}\n")
    assert "shape.yaml:7: steps[0] (step 'k') > press: expected a mapping (key, target), " in (
        message
    )
    assert message.endswith("not the text 'Enter'")
    message = load_broken(tree, "shape2", "  - {id: r, expect: {text: Ready}}\n")
    assert (
        "> expect > text: expected a mapping (target, equals, contains, matches), not the text "
        "'Ready'" in message
    )
    message = load_broken(tree, "shape3", "  - {id: s, use: billing/login, with: [a]}\n")
    assert "steps[0] (step 's') > with: expected a mapping, not a list" in message


def test_duplicate_keys_and_a_quoted_version_are_refused(tree: Path) -> None:
    # YAML itself keeps the last of two equal keys without a word.
    write(tree, "twice", HEADER.format(name="twice") + "  - {id: a, goto: /, goto: /x}\n")
    with pytest.raises(ScriptInvalid, match=r"twice.yaml:7: key 'goto' is given twice"):
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/twice")
    write(tree, "quoted", HEADER.format(name="quoted").replace("version: 1", 'version: "1"'))
    with pytest.raises(ScriptInvalid, match=r"quoted.yaml:2: version: Input should be a valid int"):
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/quoted")


def test_duplicate_step_ids_and_bad_subflow_are_refused(tree: Path) -> None:
    message = load_broken(tree, "dupes", "  - {id: a, goto: /}\n  - {id: a, goto: /}\n")
    # At the second one's line and step, not at the top of the file.
    assert "dupes.yaml:8: steps[1] (step 'a'): step id 'a' is used twice" in message
    message = load_broken(tree, "bad_use", "  - {id: signin, use: billing/no_such_flow}\n")
    assert "step 'signin'" in message and "billing/no_such_flow" in message


def test_a_step_id_twice_in_the_probe_s_steps_is_refused_at_its_line(tree: Path) -> None:
    credit = tree / "scripts" / "billing" / "issue_credit.yaml"
    probe = '    - {id: open_account, goto: "/accounts/{{ inputs.account_id }}", expect:'
    text = credit.read_text()
    assert probe in text
    credit.write_text(text.replace(probe, '    - {id: open_account, goto: "/"}\n' + probe))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert info.value.message == (
        f"{credit}:44: verify_effect > steps[1] (step 'open_account'): step id 'open_account' "
        "is used twice (first at [0])"
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "dynamic: [credit.confirmation_number,",
            "dynamic: [credit.confirmation_number, credit.confirmation_number,",
            "issue_credit.yaml:7: dynamic[1]: 'credit.confirmation_number' is already listed ([0])",
        ),
        (
            "dynamic: [",
            'redact: ["#account-name", "#account-balance", "#account-name"]\ndynamic: [',
            "issue_credit.yaml:7: redact[2]: '#account-name' is already listed ([0])",
        ),
        (
            "reason: {type: string, min_length: 1, max_length: 200}",
            "reason: {type: enum, values: [damaged item, late, damaged item]}",
            "issue_credit.yaml:12: inputs > reason > values[2]: 'damaged item' is already "
            "listed ([0])",
        ),
    ],
)
def test_a_script_list_entry_given_twice_is_refused_at_its_line(
    tree: Path, old: str, new: str, message: str
) -> None:
    credit = tree / "scripts" / "billing" / "issue_credit.yaml"
    text = credit.read_text()
    assert old in text
    credit.write_text(text.replace(old, new, 1))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert info.value.message.endswith(message)
    login = tree / "scripts" / "billing" / "login.yaml"
    credit.write_text(text)
    login.write_text(
        login.read_text().replace("billing_password]", "billing_password, billing_username]")
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert info.value.message.endswith(
        "login.yaml:6: secrets[2]: 'billing_username' is already listed ([0])"
    )


def test_subflow_cycle_is_refused(tree: Path) -> None:
    message = load_broken(tree, "loop", "  - {id: again, use: billing/loop}\n")
    assert "cycle" in message


def test_not_yaml_is_refused_in_one_line_at_its_place(tree: Path) -> None:
    write(tree, "broken", "name: [unclosed\n")
    with pytest.raises(ScriptInvalid, match=r"broken\.yaml:2: not valid YAML"):
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/broken")
    # A flow mapping left open: the line YAML stopped on, and the line the mapping began on,
    # in one line (PyYAML's own text spans six, quoting the file with carets).
    write(
        tree, "unclosed",
        "name: billing/unclosed\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: a, goto: /accounts\n  - {id: b, goto: /}\n",
    )  # fmt: skip
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/unclosed")
    assert info.value.message.endswith(
        "unclosed.yaml:6: not valid YAML: expected ',' or '}', but got '{' (column 5), "
        "while parsing a flow mapping that starts on line 5"
    )


def test_a_script_that_is_not_utf8_is_refused_by_name(tree: Path) -> None:
    write(tree, "latin1", "").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ScriptInvalid, match=r"latin1\.yaml: not UTF-8 text \(byte 9"):
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/latin1")


def test_a_character_yaml_does_not_allow_is_refused_with_its_line(tree: Path) -> None:
    # A NUL pasted into a description: the YAML reader refuses it as it is made, which used
    # to escape as a traceback (and, in a worker, left the job `queued` with no event).
    write(tree, "nul", "").write_text("name: billing/nul\nversion: 1\ndescription: Good\x00will\n")
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/nul")
    assert info.value.message.endswith(
        "nul.yaml:3: not valid YAML: character U+0000 is not allowed in YAML"
    )


def test_inputs_are_typed_and_checked(script_store: ScriptStore) -> None:
    loaded = script_store.load("billing/issue_credit")
    assert loaded.validate_inputs(CREDIT_INPUTS)["amount"] == Decimal("15.00")
    with pytest.raises(InputInvalid) as info:
        loaded.validate_inputs({**CREDIT_INPUTS, "account_id": "AC-1", "amount": "900", "x": "1"})
    message = info.value.message
    assert "input 'account_id'" in message and "pattern" in message
    assert "input 'amount'" in message and "less than or equal to 500" in message
    assert "input 'x': not declared by the script" in message
    assert info.value.field == "inputs.account_id"


def test_a_misspelt_input_name_says_which_one_it_looks_like(
    script_store: ScriptStore, tmp_path: Path
) -> None:
    loaded = script_store.load("billing/issue_credit")
    inputs = {k: v for k, v in CREDIT_INPUTS.items() if k != "amount"}
    with pytest.raises(InputInvalid) as info:
        loaded.validate_inputs({**inputs, "amout": "15.00"})
    assert "input 'amout': not declared by the script (did you mean 'amount'?) (got '15.00')" in (
        info.value.message
    )
    assert "input 'amount': Field required" in info.value.message
    # A value sent under a misspelt secret input's name is not echoed.
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts)
    credit_as_script(scripts)
    loaded = ScriptStore(scripts, SELECTORS).load("billing/credit_as")
    with pytest.raises(InputInvalid) as info:
        loaded.validate_inputs({**CREDIT_INPUTS, "agent_user": "a", "agent_pv": "hunter2-pw"})
    assert "input 'agent_pv': not declared by the script (did you mean 'agent_pw'?);" in (
        info.value.message + ";"
    )
    assert "hunter2" not in info.value.message


def test_a_supplied_output_is_judged_as_its_extraction_would_keep_it(tree: Path) -> None:
    text = (tree / "scripts" / "billing" / "issue_credit.yaml").read_text()
    (tree / "scripts" / "billing" / "issue_credit.yaml").write_text(
        text.replace('pattern: "CN-[0-9]+"', 'pattern: "Number: (CN-[0-9]+)"')
    )
    loaded = ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    # A pattern whose group keeps part of a match (its label aside) takes the part alone:
    # the value need not match the whole pattern. It was refused, every value with it.
    assert loaded.refused_outputs({"confirmation_number": "CN-7"}) is None
    refused = loaded.refused_outputs({"confirmation_number": "Number: CN-7"})
    assert refused == (
        "output 'confirmation_number': 'Number: CN-7' is not what pattern "
        "'Number: (CN-[0-9]+)' keeps: billing/issue_credit@1 would never extract it"
    )
    refused = loaded.refused_outputs({"confirmation_number": " CN-7"})
    assert refused is not None and "' CN-7' has white space" in refused


def test_templates_render_only_references() -> None:
    context = {"inputs": {"a": Decimal("15.00")}, "secrets": {}, "outputs": {}}
    assert render("/accounts/{{ inputs.a }}", context) == "/accounts/15.00"
    assert [r.name for r in references("{{ inputs.a }}-{{ outputs.b }}")] == ["a", "b"]
    for bad in ("{{ inputs.a | upper }}", "{% if x %}y{% endif %}", "{{ 1 + 1 }}", "{{ x }}"):
        with pytest.raises(TemplateError):
            references(bad)


def test_a_secret_declared_and_never_used_is_refused_at_load(tree: Path) -> None:
    """A worker refuses every job whose declared secrets it lacks: one no step uses would
    refuse jobs for nothing."""
    write(
        tree, "leftover",
        "name: billing/leftover\nversion: 1\nsite: billing\n"
        "secrets: [billing_password, billing_api_token]\n"
        "steps:\n"
        '  - {id: pw, fill: {target: login.password, value: "{{ secrets.billing_password }}"}}\n',
    )  # fmt: skip
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/leftover")
    assert "leftover.yaml:4: secrets[1]: secret 'billing_api_token' is declared but no step " in (
        info.value.message
    )


def test_commit_step_without_a_probe_is_refused_unless_opted_out(tree: Path) -> None:
    message = load_broken(tree, "no_probe", "  - {id: pay, click: confirm.submit, commit: true}\n")
    assert "verify_effect" in message
    write(
        tree, "opted_out",
        HEADER.format(name="opted_out")
        + '  - {id: pay, click: confirm.submit, commit: true}\n'
        + '  - {id: next, goto: "/accounts/{{ inputs.account_id }}"}\n'
        + "verify_effect: {opt_out: the site rejects duplicate references itself}\n",
    )  # fmt: skip
    loaded = ScriptStore(tree / "scripts", tree / "selectors").load("billing/opted_out")
    assert loaded.plan[0].step.commit


def test_rules_and_alternates_are_checked_at_load_time(tree: Path) -> None:
    message = load_broken(
        tree, "bad_alt", "  - {id: go, click: account.issue_credit, alternate: nowhere}\n"
    )
    assert "no alternate path 'nowhere'" in message
    # Said once, at the field's own line: not `steps[0] (step 'pay'): step 'pay': retry_from`.
    message = load_broken(
        tree,
        "bad_retry",
        "  - id: pay\n    click: confirm.submit\n    commit: true\n    retry_from: opne\n"
        "verify_effect: {opt_out: a test flow}\n",
    )
    assert message.endswith(
        "bad_retry.yaml:10: steps[0] (step 'pay') > retry_from: 'opne' is not an earlier step"
    )
    message = load_broken(
        tree, "bad_rule", "  - {id: go, click: account.issue_credit, on_failure: {timeout: redo}}\n"
    )
    assert "step 'go'" in message and "on_failure" in message
    # Rules for the whole script are checked too.
    message = load_broken(
        tree,
        "bad_script_rule",
        "  - {id: go, click: account.issue_credit}\n"
        "on_failure: {selector_not_found: {action: alternate, alternate: nope}}\n",
    )
    assert (
        "bad_script_rule.yaml:8: on_failure > selector_not_found: no alternate path 'nope'"
        in message
    )
    message = load_broken(
        tree,
        "no_reason",
        '  - {id: pay, click: confirm.submit, commit: true}\nverify_effect: {opt_out: "  "}\n',
    )
    assert "verify_effect > opt_out: is blank: say why the commit steps need no probe" in message


def test_an_alternate_a_registry_rule_names_must_be_in_the_script(tree: Path) -> None:
    """The executor takes a registry rule's alternate path from the job's script: one it
    lacks passed `formwork validate`, then a KeyError traceback ended the job. A sub-flow's
    rules take the sub-flow's own paths."""
    registry = tree / "selectors" / "billing.yaml"
    original = registry.read_text()
    registry.write_text(
        original + "on_failure:\n  selector_not_found: {action: alternate, alternate: by_url}\n"
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert (
        "billing.yaml:54: on_failure > selector_not_found: alternate path 'by_url' is not in "
        "billing/issue_credit" in info.value.message
    )
    registry.write_text(original)
    write(
        tree, "open_form",
        "name: billing/open_form\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: go, click: account.issue_credit, alternate: by_url}\n"
        "alternates:\n  by_url:\n    - {id: go, goto: /accounts/AC-10231/credits/new}\n",
    )  # fmt: skip
    write(
        tree, "caller",
        "name: billing/caller\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: form, use: billing/open_form}\n",
    )  # fmt: skip
    loaded = ScriptStore(tree / "scripts", tree / "selectors").load("billing/caller")
    assert [p.id for p in loaded.alternates["form.by_url"]] == ["form.go"]


def test_an_alternate_path_no_rule_takes_is_refused_at_load(tree: Path) -> None:
    """A path declared for a failure and named by nothing loaded, and was never taken."""
    rest = "alternates:\n  by_url:\n    - {id: go, goto: /accounts/AC-10231/credits/new}\n"
    message = load_broken(tree, "unused", "  - {id: go, click: account.issue_credit}\n" + rest)
    assert message.endswith(
        "unused.yaml:9: alternates > by_url: alternate path 'by_url' is taken by no rule: name "
        "it where a step may fail (`alternate: by_url` on the step, or an on_failure rule "
        "`{action: alternate, alternate: by_url}`), or remove it"
    )
    # A sub-flow's own, said in its own file.
    write(
        tree, "open_form",
        "name: billing/open_form\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: go, click: account.issue_credit}\n" + rest,
    )  # fmt: skip
    message = load_broken(tree, "caller", "  - {id: form, use: billing/open_form}\n")
    assert "open_form.yaml:7: alternates > by_url: alternate path 'by_url' is taken by no rule" in (
        message
    )
    # Named by a rule of the script, or of the registry, it loads.
    write(
        tree, "open_form",
        "name: billing/open_form\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: go, click: account.issue_credit}\n"
        "on_failure: {selector_not_found: {action: alternate, alternate: by_url}}\n" + rest,
    )  # fmt: skip
    write(
        tree, "caller",
        "name: billing/caller\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: form, use: billing/open_form}\n",
    )  # fmt: skip
    ScriptStore(tree / "scripts", tree / "selectors").load("billing/caller")
    registry = tree / "selectors" / "billing.yaml"
    registry.write_text(
        registry.read_text()
        + "on_failure:\n  selector_not_found: {action: alternate, alternate: form_by_url}\n"
    )
    text = (tree / "scripts" / "billing" / "issue_credit.yaml").read_text()
    (tree / "scripts" / "billing" / "issue_credit.yaml").write_text(
        text.replace(", alternate: form_by_url}", "}")
    )
    ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")


def test_an_empty_failure_detector_list_is_refused_at_load(tree: Path) -> None:
    """`validation_error: []` read as if the site's errors were looked for; none ever were."""
    registry = tree / "selectors" / "billing.yaml"
    text = registry.read_text()
    registry.write_text(
        text.replace('validation_error: [".field-error", "p.error-text"]', "validation_error: []")
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert info.value.message.endswith(
        "billing.yaml:46: detectors > validation_error: an empty list detects nothing: list the "
        "CSS selectors of how the site shows it, or leave 'validation_error' out if the site "
        "never does"
    )


@pytest.mark.parametrize(
    ("when", "message"),
    [
        # Never true, never false: a job would wait for approval every time (fails closed).
        (
            "inputs.account_id > 100",
            "approval > when: compares 'inputs.account_id' with 100: a string input never holds "
            "a value of type int",
        ),
        # A typo of a choice: the gate would never close.
        (
            "inputs.tier == 'gold' or inputs.tier in ['silvr']",
            "approval > when: compares 'inputs.tier' with 'silvr': it is not one of the enum's "
            "values ('gold', 'silver')",
        ),
        ("inputs.big == 'yes'", "a bool input never holds a value of type str"),
    ],
)
def test_an_approval_condition_that_cannot_mean_what_it_says_is_refused_at_load(
    tree: Path, when: str, message: str
) -> None:
    write(
        tree, "gated",
        "name: billing/gated\nversion: 1\nsite: billing\ninputs:\n"
        "  account_id: {type: string}\n"
        "  tier: {type: enum, values: [gold, silver]}\n"
        "  big: {type: bool}\n"
        "steps:\n"
        '  - {id: open, goto: "/accounts/{{ inputs.account_id }}"}\n'
        f"  - {{id: pay, click: confirm.submit, commit: true, approval: {{when: \"{when}\", "
        "role: billing, risk: x}}\n"
        "verify_effect: {opt_out: a test flow}\n",
    )  # fmt: skip
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/gated")
    assert "gated.yaml:10: steps[1] (step 'pay')" in info.value.message
    assert message in info.value.message


@pytest.mark.parametrize(
    ("rest", "message"),
    [
        (
            "alternates:\n  by_hand:\n    - {id: pay, click: confirm.submit, commit: true}\n"
            "verify_effect: {opt_out: the site refuses a second credit itself}\n",
            "detour.yaml:10: alternates > by_hand[0] (step 'pay'): commit: true is not allowed "
            "in alternate path 'by_hand'",
        ),
        (
            "alternates:\n  by_hand:\n    - {id: sub, use: billing/pay}\n"
            "verify_effect: {opt_out: the site refuses a second credit itself}\n",
            "pay.yaml:5: steps[0] (step 'send'): commit: true is not allowed in alternate path "
            "'by_hand'",
        ),
        (
            "alternates:\n  by_hand:\n    - {id: open, goto: /accounts/AC-10231/credits/new}\n"
            "verify_effect:\n  steps:\n    - {id: pay, click: confirm.submit, commit: true}\n"
            "  present: {visible: credit.confirmation}\n",
            "detour.yaml:13: verify_effect > steps[0] (step 'pay'): commit: true is not allowed "
            "in verify_effect",
        ),
        (
            "alternates:\n  by_hand:\n"
            "    - {id: open, click: account.issue_credit, alternate: by_hand}\n",
            "detour.yaml:10: alternates > by_hand[0] (step 'open'): alternate 'by_hand' is not "
            "allowed in alternate path 'by_hand'",
        ),
    ],
)
def test_a_commit_or_an_alternate_on_a_detour_is_refused_at_load(
    tree: Path, rest: str, message: str
) -> None:
    """Alternate paths and the probe are detours the executor does not journal, probe, gate or
    recover: a commit there (a `retry_step` would send it again) or an alternate (never taken)
    must not load."""
    write(
        tree, "pay",
        "name: billing/pay\nversion: 1\nsite: billing\nsteps:\n"
        "  - {id: send, click: confirm.submit, commit: true}\n"
        "verify_effect: {opt_out: a test flow}\n",
    )  # fmt: skip
    message_seen = load_broken(
        tree, "detour", "  - {id: go, click: account.issue_credit, alternate: by_hand}\n" + rest
    )
    assert message in message_seen


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            '- {id: a, fill: {target: credit.amount, value: "1"}, dialog: accept}\n',
            "steps[0] (step 'a') > dialog: only goes with click or press",
        ),
        ("- {id: a, click: credit.review, dialog: {action: accept, message: '('}}\n", "regular"),
        ("- {id: a, upload: {target: credit.amount, file: /etc/passwd}}\n", "relative path"),
        ("- {id: a, upload: {target: credit.amount, file: ../secrets.yaml}}\n", "no '..'"),
        # Patterns run after a commit too: a bad one must not first show itself there.
        (
            "- {id: a, extract: {n: {target: credit.confirmation_number, pattern: 'CN-[0-9+'}}}\n",
            "broken_dsl.yaml:7: steps[0] (step 'a') > extract > n > pattern: not a "
            "valid regular expression: unterminated character set",
        ),
        (
            "- {id: a, expect: {text: {target: credit.confirmation_number, matches: '(x'}}}\n",
            "> matches: not a valid regular expression: missing )",
        ),
        # An output keeps one value: a second group would be dropped without a word.
        (
            "- {id: a, extract: {n: {target: credit.confirmation_number,"
            " pattern: '(CN)-([0-9]+)'}}}\n",
            "steps[0] (step 'a') > extract > n > pattern: has 2 groups, and an output keeps one",
        ),
        ("- {id: a, extract: {}}\n", "steps[0] (step 'a') > extract: names no output"),
    ],
)
def test_dialogs_and_uploads_are_checked_at_load_time(tree: Path, steps: str, message: str) -> None:
    assert message in load_broken(tree, "broken_dsl", steps)


def test_dialog_shorthand_and_frame_candidates_load(script_store: ScriptStore) -> None:
    loaded = script_store.load("orders/refund_order")
    submit = next(p.step for p in loaded.plan if p.id == "submit")
    assert submit.dialog is not None and submit.dialog.action == "accept"
    (candidate,) = loaded.registry.candidates("payment.use")
    assert candidate.frame == "iframe#payment-widget"
    assert (
        candidate.describe() == "frame=iframe#payment-widget >> role=button[name='Use this method']"
    )
    upload = next(p for p in loaded.plan if p.action == "upload")
    assert upload.step.targets() == ["refund.receipt"]


def test_registry_roles_and_empty_selectors_are_checked_at_load(tree: Path) -> None:
    registry = tree / "selectors" / "billing.yaml"
    original = registry.read_text()
    for old, new, message in (
        (
            "{role: heading, name: Billing console}",
            "{role: headingz, name: Billing console}",
            "billing.yaml:18: elements > dashboard.header[0] > role: 'headingz' "
            "is not an ARIA role; did you mean 'heading'?",
        ),
        ('{css: "#account-name"}', '{css: ""}', "an empty selector matches nothing"),
        ('"h1.server-error"]', '"h1.server-error", " "]', "an empty selector matches nothing"),
        # A blank label is as empty: it waited out the step, then handed off as if the site
        # had changed.
        (
            "{label: Amount}",
            '{label: ""}',
            "billing.yaml:31: elements > credit.amount[0] > label: an empty selector matches "
            "nothing",
        ),
        ("{label: Reason}", "{text: ' '}", "credit.reason[0] > text: an empty selector"),
        # Said as what it is, not as "got none" of the kinds.
        ("{role: heading, name: Billing console}", "{name: Billing console}", "'name' only goes"),
    ):
        registry.write_text(original.replace(old, new))
        with pytest.raises(ScriptInvalid) as info:
            ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
        assert message in info.value.message


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # A fallback copied from the primary, its edit forgotten: the fallback meant is missing.
        (
            "{role: button, name: Find account}]",
            "{role: button, name: Find account}, {css: '#find'},\n"
            "                     {role: button, name: Find account, exact: true}]",
            "billing.yaml:21: elements > lookup.submit[2]: the same candidate as [0] "
            "(role=button[name='Find account'])",
        ),
        (
            '["form#login"]',
            '["form#login", "form#login"]',
            "billing.yaml:47: detectors > login_page[1]: 'form#login' is already listed ([0])",
        ),
        # Validation wins over a banner: a banner listed as both asked the customer.
        (
            '[".alert-danger",',
            '[".alert-danger", "p.error-text",',
            "billing.yaml:48: detectors > error_banner[1]: 'p.error-text' is already a "
            "validation_error detector (validation_error[1]): one selector cannot tell two "
            "kinds of trouble apart",
        ),
        (
            "[login.username, login.password]",
            "[login.username, login.password, login.username]",
            "billing.yaml:10: secret_elements[2]: 'login.username' is already listed ([0])",
        ),
        (
            "[127.0.0.1, localhost]",
            "[127.0.0.1, localhost, LOCALHOST]",
            "billing.yaml:5: allowed_hosts[2]: 'localhost' is already listed ([1])",
        ),
    ],
)
def test_a_registry_entry_given_twice_is_refused_at_its_line(
    tree: Path, old: str, new: str, message: str
) -> None:
    registry = tree / "selectors" / "billing.yaml"
    text = registry.read_text()
    assert old in text
    registry.write_text(text.replace(old, new, 1))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert info.value.message == f"{registry}:{message.split(':', 1)[1]}"
    # One that differs (an inexact match of the same name) is a fallback of its own.
    registry.write_text(
        text.replace("{role: button, name: Find account}]", "{role: button, name: Find account},"
                     " {role: button, name: Find account, exact: false}]")
    )  # fmt: skip
    ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # Passed load before, then crashed building the input model at the first job.
        (
            "{type: string, min_length: 1, max_length: -5}",
            "bounds.yaml:6: inputs > x > max_length: Input should be greater than or equal to 0",
        ),
        (
            '{type: decimal, min: "500", max: "0.01"}',
            "bounds.yaml:6: inputs > x > max: 'min' (500) is more than 'max' (0.01)",
        ),
        ("{type: int, min: 10, max: 1}", "inputs > x > max: 'min' (10) is more than 'max' (1)"),
        (
            "{type: string, min_length: 5, max_length: 2}",
            "inputs > x > max_length: 'min_length' (5) is more than 'max_length' (2)",
        ),
        ("{type: int, places: 2}", "bounds.yaml:6: inputs > x: 'places' only goes with type"),
        ("{type: decimal, places: -1}", "inputs > x > places: Input should be greater than or"),
        ("{type: decimal, places: true}", "inputs > x > places: Input should be a valid integer"),
        (
            "{type: decimal, places: 100000000000000000000}",
            "inputs > x > places: Input should be less than or equal to 28",
        ),
        (
            '{type: decimal, min: "0.001", places: 2}',
            "bounds.yaml:6: inputs > x > min: 'min' (0.001) has more decimal places than "
            "'places' allows (2)",
        ),
        ('{type: decimal, min: "1e-2"}', "inputs > x > min: a decimal is written in plain digits"),
        (
            "{type: bool, min_length: 3}",
            "bounds.yaml:6: inputs > x: 'min_length'/'max_length' only go with type 'string'",
        ),
    ],
)
def test_input_bounds_that_cannot_hold_are_refused_at_load(
    tree: Path, spec: str, message: str
) -> None:
    header = HEADER.format(name="bounds").replace("steps:", f"  x: {spec}\nsteps:")
    write(
        tree, "bounds", header + '  - {id: go, goto: "/{{ inputs.account_id }}/{{ inputs.x }}"}\n'
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/bounds")
    assert message in info.value.message


def test_a_decimal_in_exponent_notation_is_refused_and_a_json_number_is_taken(
    script_store: ScriptStore,
) -> None:
    loaded = script_store.load("billing/issue_credit")
    # Typed into the site, "1e2" would be 100: a value nobody wrote.
    for written in ("1e2", " 1E1 ", "2.5e-1", "-1E+1"):
        with pytest.raises(InputInvalid) as info:
            loaded.validate_inputs({**CREDIT_INPUTS, "amount": written})
        assert info.value.message == (
            "inputs rejected by billing/issue_credit@1: input 'amount': a decimal is written in "
            f"plain digits (like 100 or 0.05), not in exponent notation (got {written!r})"
        )
        assert info.value.field == "inputs.amount"
    for written in ("NaN", "Infinity", "-inf"):
        with pytest.raises(InputInvalid, match="input 'amount': Input should be a finite number"):
            loaded.validate_inputs({**CREDIT_INPUTS, "amount": written})
    # A JSON number is the sender's serializer's text, and is typed as its digits.
    for number, typed in ((15, "15"), (0.1, "0.1"), (1e2, "100.0")):
        inputs = loaded.validate_inputs({**CREDIT_INPUTS, "amount": number})
        assert render("{{ inputs.amount }}", {"inputs": inputs}) == typed
        assert loaded.redacted_inputs(inputs)["amount"] == typed
    # Below 1E-6 a Decimal prints as an exponent however it was written.
    assert render("{{ inputs.a }}", {"inputs": {"a": Decimal("0.00000015")}}) == "0.00000015"


def test_negative_zero_is_typed_as_zero(tree: Path) -> None:
    # With a minimum of 0, "-0.00" (or JSON's -0.0) was taken and typed with its minus sign.
    header = HEADER.format(name="zero").replace("steps:", '  x: {type: decimal, min: "0"}\nsteps:')
    write(tree, "zero", header + '  - {id: go, goto: "/{{ inputs.account_id }}/{{ inputs.x }}"}\n')
    loaded = ScriptStore(tree / "scripts", tree / "selectors").load("billing/zero")
    for written, typed in (("-0.00", "0.00"), (-0.0, "0.0"), ("-0", "0"), ("0.5", "0.5")):
        inputs = loaded.validate_inputs({"account_id": "AC-10231", "x": written})
        assert render("{{ inputs.x }}", {"inputs": inputs}) == typed


def test_a_rejected_value_is_echoed_in_part_with_its_length(script_store: ScriptStore) -> None:
    # The message is copied into events, reports and webhooks: a 5000-character value (or
    # name) would be copied whole into each.
    loaded = script_store.load("billing/issue_credit")
    with pytest.raises(InputInvalid) as info:
        loaded.validate_inputs({**CREDIT_INPUTS, "reason": "r" * 5000, "n" * 3000: "x"})
    message = info.value.message
    assert (
        f"input 'reason': String should have at most 200 characters (got {'r' * 60!r}… "
        "(5000 characters))" in message
    )
    assert f"input {'n' * 60!r}… (3000 characters): not declared by the script" in message
    assert len(message) < 400, len(message)
    # A short value is shown whole, as before.
    with pytest.raises(InputInvalid, match=r"\(got 'AC-1'\)"):
        loaded.validate_inputs({**CREDIT_INPUTS, "account_id": "AC-1"})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "{type: bool, default: maybe}",
            "defaults.yaml:6: inputs > x > default: 'maybe' is not a valid bool default: "
            "Input should be a valid boolean",
        ),
        (
            '{type: int, default: "abc"}',
            "defaults.yaml:6: inputs > x > default: 'abc' is not a valid int default: "
            "Input should be a valid integer",
        ),
        ("{type: int, default: true}", "inputs > x > default: True is not a valid int default"),
        (
            "{type: int, min: 1, max: 9, default: 10}",
            "inputs > x > default: 10 is not a valid int default: Input should be less than "
            "or equal to 9",
        ),
        (
            '{type: decimal, default: "1e2"}',
            "inputs > x > default: '1e2' is not a valid decimal default: a decimal is written "
            "in plain digits",
        ),
        (
            "{type: enum, values: [a, b], default: c}",
            "inputs > x > default: 'c' is not a valid enum default: Input should be 'a' or 'b'",
        ),
        (
            '{type: string, pattern: "^[0-9]+$", default: "x1"}',
            "inputs > x > default: 'x1' is not a valid string default: String should match",
        ),
        ("{type: string, default: 5}", "'x' > default: 5 is not a valid string default"),
    ],
)
def test_an_input_default_that_is_not_a_value_of_its_type_is_refused_at_load(
    tree: Path, spec: str, message: str
) -> None:
    # Defaults were never validated: `maybe` and `abc` were typed into a URL as written.
    header = HEADER.format(name="defaults").replace("steps:", f"  x: {spec}\nsteps:")
    write(
        tree,
        "defaults",
        header + '  - {id: go, goto: "/{{ inputs.account_id }}/{{ inputs.x }}"}\n',
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/defaults")
    assert message.replace("'x' > ", "inputs > x > ") in info.value.message


def test_an_input_default_is_used_as_a_value_of_its_type(tree: Path) -> None:
    inputs = (
        "  flag: {type: bool, default: false}\n"
        '  count: {type: int, default: "7"}\n'
        '  amount: {type: decimal, default: "0.50"}\n'
    )
    header = HEADER.format(name="typed").replace("steps:", inputs + "steps:")
    url = "/{{ inputs.account_id }}/{{ inputs.flag }}/{{ inputs.count }}/{{ inputs.amount }}"
    write(tree, "typed", header + f'  - {{id: go, goto: "{url}"}}\n')
    loaded = ScriptStore(tree / "scripts", tree / "selectors").load("billing/typed")
    typed = loaded.validate_inputs({"account_id": "AC-1"})
    assert typed == {
        "account_id": "AC-1", "flag": False, "count": 7, "amount": Decimal("0.50")
    }  # fmt: skip
    assert render(url, {"inputs": typed}) == "/AC-1/False/7/0.50"


def test_a_step_without_an_id_is_not_said_to_miss_it_inside_its_action(tree: Path) -> None:
    message = load_broken(tree, "no_id", "  - {fill: {target: credit.amount, value: x}}\n")
    assert message == f"{tree}/scripts/billing/no_id.yaml:7: steps[0]: 'id' is required"


def test_a_broken_login_flow_is_blamed_on_the_registry(tree: Path) -> None:
    registry = tree / "selectors" / "billing.yaml"
    registry.write_text(
        registry.read_text().replace("login_flow: billing/login", "login_flow: billing/logon")
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert f"{registry}:7: login_flow: no script 'billing/logon'" in info.value.message


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        # Its elements lined up with this registry, so it loaded: a session that expired on
        # the billing portal was signed in again with the order console's name and password.
        (
            "orders/login",
            "login_flow: 'orders/login' is a script of site 'orders': a site signs in with "
            "one of its own (billing/...)",
        ),
        ("billing/../../etc/x", "login_flow: String should match pattern"),
    ],
)
def test_a_login_flow_of_another_site_or_not_a_script_name_is_refused_on_its_line(
    tree: Path, flow: str, message: str
) -> None:
    registry = tree / "selectors" / "billing.yaml"
    registry.write_text(
        registry.read_text()
        .replace("login_flow: billing/login", f"login_flow: {flow}")
        .replace("  dashboard.header:", "  search.header: [{css: h1}]\n  dashboard.header:")
    )
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert info.value.message.startswith(f"{registry}:7: {message}")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{{ input.reference }}",
            "billing.yaml:28: elements > account.credit_row[0] > css: bad template",
        ),
        (
            "{{ secrets.billing_password }}",
            "billing.yaml:28: elements > account.credit_row[0] > css: "
            "'{{ secrets.billing_password }}': a secret may not appear in a selector",
        ),
    ],
)
def test_a_selector_template_is_checked_with_its_registry(
    tree: Path, template: str, message: str
) -> None:
    registry = tree / "selectors" / "billing.yaml"
    registry.write_text(registry.read_text().replace("{{ inputs.reference }}", template))
    with pytest.raises(ScriptInvalid) as info:
        ScriptStore(tree / "scripts", tree / "selectors").load("billing/issue_credit")
    assert message in info.value.message
    assert "steps[" not in info.value.message  # not blamed on the step using it


def test_an_undeclared_input_in_a_selector_names_the_element_and_registry(tree: Path) -> None:
    message = load_broken(tree, "row", "  - {id: find, click: account.credit_row}\n")
    assert (
        "row.yaml:7: steps[0] (step 'find'): the selector of 'account.credit_row' in "
        "selectors/billing.yaml: '{{ inputs.reference }}' is not a declared input of billing/row"
    ) in message


@pytest.mark.parametrize("command", ["run", "enqueue", "resume"])
def test_an_input_given_twice_on_the_command_line_is_refused(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["job-1", "retry_with_inputs"] if command == "resume" else ["billing/issue_credit"]
    pairs = ["--input", "account_id=A", "--input", "account_id=B"]
    assert main([command, *target, *pairs]) == 2
    assert "input 'account_id' given twice" in capsys.readouterr().err


def test_a_goto_to_a_host_outside_the_allowlist_is_refused_at_load(tree: Path) -> None:
    # Every job would be stopped there at run time (navigation_blocked): say so at load.
    message = load_broken(
        tree,
        "away",
        '  - {id: away, goto: "https://evil.example.com/x?a={{ inputs.account_id }}"}\n',
    )
    assert "away.yaml:7" in message and "step 'away'" in message
    assert "'evil.example.com' is not one of site billing's allowed_hosts" in message
    for scheme in ("javascript:alert(1)", "data:text/html,hi", "file:///etc/passwd"):
        message = load_broken(tree, "scheme", f'  - {{id: away, goto: "{scheme}"}}\n')
        assert "step 'away'" in message and "only a path on the site or an http(s) URL" in message
    # An allowed host written out, and a host a template fills in, both load.
    for name, url in (
        ("here", "http://127.0.0.1:8811/accounts"),
        ("later", "https://{{ inputs.account_id }}/"),
    ):
        write(
            tree,
            name,
            HEADER.format(name=name)
            + f'  - {{id: go, goto: "{url}?a={{{{ inputs.account_id }}}}"}}\n',
        )
        ScriptStore(tree / "scripts", tree / "selectors").load(f"billing/{name}")
