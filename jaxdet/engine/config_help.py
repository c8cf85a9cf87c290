"""What an entry point prints for `-h` / `--help` and `--print-config`.

An entry point describes itself once with a `Usage` and hands it to `config_cli.parse_args`::

  USAGE = config_cli.Usage(
      command='python -m jaxdet.evaluate',
      summary='Evaluate a checkpoint on the config's val set (COCO mAP).',
      flags=(('--checkpoint DIR', 'a work_dir, its checkpoints folder or a step folder', True),
             ('--out FILE', 'also write the detections as COCO JSON')),
      more='README.md "Evaluate"; the config file's docstring.')
  spec, overrides, flags = config_cli.parse_args(argv, known_flags=..., usage=USAGE)

`parse_args` then answers `-h` / `--help` with `USAGE.text()` (plus the resolved config when
`--config` is given) and `--print-config` with the resolved config, and exits 0.
"""
import dataclasses
import sys
import textwrap
from typing import Sequence

import ml_collections

CONFIG_FLAG = ('--config CONFIG.py[:ARG]',
               "the config file and the argument of its get_config(), e.g. configs/atss.py:smoke")
OVERRIDE_FLAG = ('--config.KEY=VALUE',
                 'set one config key (repeatable), e.g. --config.optimizer.base_lr=0.005; '
                 'unknown keys are errors')
PRINT_FLAG = ('--print-config', 'print the resolved config (after the overrides) and exit')
HELP_FLAG = ('-h, --help', 'this help; with --config, also the resolved config; exit')


@dataclasses.dataclass(frozen=True)
class Usage:
  """An entry point's help.

  command: how it is run, e.g. 'python -m jaxdet.train'.
  summary: one or two sentences: what it does.
  flags: its own flags (not --config / overrides / help) as (flag with its value's name, one-line
    meaning) pairs, or (flag, meaning, True) for a required flag.
  positional: what follows the flags, e.g. 'IMAGES_OR_FOLDERS...' ('' for nothing).
  config: whether --config is 'required', 'optional' or 'none' (no config at all).
  more: where to look next (the README section, the config's docstring, ...).
  """
  command: str
  summary: str
  flags: Sequence[tuple] = ()
  positional: str = ''
  config: str = 'required'
  more: str = ''

  def rows(self):
    """(flag, meaning, required) for every flag the command takes, in the help's order."""
    rows = []
    if self.config != 'none':
      rows.append(CONFIG_FLAG + (self.config == 'required',))
    rows.extend((f[0], f[1], len(f) > 2 and bool(f[2])) for f in self.flags)
    if self.config != 'none':
      rows.extend([OVERRIDE_FLAG + (False,), PRINT_FLAG + (False,)])
    rows.append(HELP_FLAG + (False,))
    return rows

  def synopsis_parts(self):
    parts = [self.command]
    for flag, _, required in self.rows()[:-1]:
      if flag == OVERRIDE_FLAG[0]:
        parts.append('[--config.KEY=VALUE ...]')
      elif flag != PRINT_FLAG[0]:
        parts.append(flag if required else f'[{flag}]')
    if self.positional:
      parts.append(self.positional)
    return parts

  def synopsis(self):
    return ' '.join(self.synopsis_parts())

  def text(self, width=100):
    """The help text: usage line, summary, one line per flag, where to look next."""
    wrap = lambda s, hang='': textwrap.fill(s, width, subsequent_indent=hang,
                                           break_on_hyphens=False, break_long_words=False)
    lines = ['usage:']
    for part in self.synopsis_parts():  # wrapped between flags, never inside one
      if len(lines[-1]) + 1 + len(part) > width and lines[-1].strip():
        lines.append(' ' * (len('usage: ') + 4))
      lines[-1] += ('' if lines[-1].endswith(' ') else ' ') + part
    lines += ['', wrap(self.summary), '', 'flags:']
    rows = self.rows()
    column = min(max(len(f) for f, _, _ in rows) + 4, 30)
    for flag, meaning, required in rows:
      meaning = meaning + (' (required)' if required else '')
      head = f'  {flag}'
      if len(head) + 2 > column:
        lines.append(head)
        head = ''
      lines.append(textwrap.fill(meaning, width, initial_indent=head.ljust(column),
                                 subsequent_indent=' ' * column, break_on_hyphens=False,
                                 break_long_words=False))
    if self.more:
      lines += ['', wrap('more: ' + self.more, hang='      ')]
    return '\n'.join(lines)


def format_config(config: ml_collections.ConfigDict, header: str = '') -> str:
  """Every leaf of `config` as `key.path = value` (Python literals), in key order: each line is
  also the `--config.key.path=value` override that sets it."""
  lines = [header] if header else []

  def walk(node, prefix):
    for name in node.keys():
      value = node[name]
      if isinstance(value, ml_collections.ConfigDict) and len(value.keys()):
        walk(value, f'{prefix}{name}.')
      elif isinstance(value, ml_collections.ConfigDict):
        lines.append(f'{prefix}{name} = {{}}')
      else:
        lines.append(f'{prefix}{name} = {value!r}')

  walk(config, '')
  return '\n'.join(lines)


def print_help(usage, config, spec, overrides, *, help_text=True):
  """-h / --help: `usage`'s text, then (when a config was given) the resolved `config`;
  --print-config (help_text False): the resolved config alone."""
  if help_text:
    print(usage.text())
    if config is not None:
      print()
  if config is not None:
    count = f' + {len(overrides)} override(s)' if overrides else ''
    print(format_config(config, f'# resolved config: {spec}{count}'))
  sys.stdout.flush()
