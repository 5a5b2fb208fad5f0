"""The README says what the code does: its sweep example validates, its settings table is current."""
import re
from pathlib import Path

from click.testing import CliRunner

from runner.cli import main, settings_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_settings_table_is_current():
    block = README.split("<!-- settings-table:start -->\n")[1].split("<!-- settings-table:end -->")[0]
    assert block.strip() == settings_table().strip(), "paste `sweep settings` into the README"


def test_readme_sweep_example_validates(tmp_path):
    example = re.search(r"## A sweep file\n\n```yaml\n(.*?)```", README, re.S).group(1)
    path = tmp_path / "example.yaml"
    path.write_text(example)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output + str(result.stderr)
    # 2 models x 4 ratios x 2 schedules x 2 quant x 2 seeds = 64, + the include rule's
    # resnet18 x 2 ratios x 2 x 2 x 2 = 16, - lenet5 with static = 16. Dense points do not
    # depend on the schedule: 6 of them collapse (resnet18 2 quant x 2 seeds, lenet5 2 seeds).
    assert "(64 grid points, 58 unique trials)" in result.output


def test_every_sweep_file_validates():
    for path in sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")):
        result = CliRunner().invoke(main, ["validate", str(path)])
        assert result.exit_code == 0, f"{path}: {result.stderr}"
        header = path.read_text().splitlines()[:12]
        assert any(f"sweep run  sweeps/{path.name}" in line or f"sweep run sweeps/{path.name}" in line
                   for line in header), f"{path} should show the command that runs it in its header"
