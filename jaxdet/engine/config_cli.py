"""Configs from the command line: `path/to/config.py[:arg]` plus `--config.a.b=value` overrides.

A config file is plain Python defining `get_config(arg=None)` that returns an
`ml_collections.ConfigDict` (big_vision style). It is loaded from its path, so `configs/` need not
be an importable package; while it loads, the file's grandparent directory (the repository root for
`configs/atss.py`) is on `sys.path`, so it may `from configs._base_ import runtime`.

Overrides name an existing key and are converted to that key's type::

  --config.optimizer.base_lr=0.005          # float (an int is accepted: 1 -> 1.0)
  --config.data.img_scale=(640,480)         # tuple (a list is converted)
  --config.model.backbone.depth=101         # int
  --config.workflow="[('train',1)]"         # any literal, via ast.literal_eval
  --config.max_steps 10                     # the two-token form; placeholders take their type
  --config.work_dir=runs/a                  # str fields take the raw text
  --config.data.pipeline.to_bgr=true        # bool from true/false/yes/no/1/0
  --config.optimizer.paramwise.custom_keys="{'backbone': {'lr_mult': 0.1}}"  # an empty group

Every problem is a one-line `ConfigError` (a ValueError) naming the key, e.g.
`unknown config key 'optimizer.base_lrr' (did you mean 'optimizer.base_lr'?)`.
Entry points run their `main` through `main_error_exit` to print `error: <message>` and exit 2::

  def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec, overrides, flags = parse_args(argv, known_flags=('workdir',))
    config = load_config(spec, overrides)
    ...

  if __name__ == '__main__':
    main_error_exit(main)
"""
import ast
import contextlib
import difflib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from typing import Any, Sequence

import ml_collections
import numpy as np

from jaxdet.engine.config_help import Usage, print_help  # noqa: F401  (Usage: for entry points)

_SPEC = re.compile(r'^(?P<path>.+?\.py)(?::(?P<arg>.*))?$')
_TRUE = ('true', 'yes', 'y', 'on', '1')
_FALSE = ('false', 'no', 'n', 'off', '0')


class ConfigError(ValueError):
  """Bad config file, argument, or override. The message is one line and names the key."""


# ------------------------------------------------------------------------------------------ loading

def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `spec` ('path/to/config.py' or 'path/to/config.py:arg') and applies `overrides`.

  `overrides`: strings '--config.a.b=value' (also 'config.a.b=value', 'a.b=value') or the
  two-token form ['--config.a.b', 'value']. Applied in order; later ones win.
  Raises ConfigError for a missing file, a file without `get_config`, an unknown key or a value
  of the wrong type.
  """
  match = _SPEC.match(spec or '')
  if not match:
    raise ConfigError(f"config must be 'path/to/config.py' or 'path/to/config.py:arg', got {spec!r}")
  path, arg = match.group('path'), match.group('arg')
  config = _call_get_config(path, arg)
  for key, raw in _pair_overrides(overrides):
    apply_override(config, key, raw)
  return config


def _call_get_config(path, arg):
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  roots = _import_roots(path)
  name = '_jaxdet_config_' + re.sub(r'\W', '_', os.path.relpath(path, roots[0])[:-3])
  with _on_sys_path(roots):
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses/pickle inside a config may look the module up
    module_spec.loader.exec_module(module)
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
      raise ConfigError(f'config file {path} defines no get_config()')
    if arg is not None and not _accepts_one_argument(get_config):
      raise ConfigError(f'config file {path}: get_config() takes no argument, got {arg!r}')
    config = get_config() if arg is None else get_config(arg)
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'config file {path}: get_config() returned {type(config).__name__}, '
                      'not an ml_collections.ConfigDict')
  return config


def _import_roots(path):
  """Directories a config's imports resolve from: its grandparent (the repository root for
  'configs/x.py') and the parent of the nearest enclosing 'configs' folder (for
  'configs/sub/x.py')."""
  roots = [os.path.dirname(os.path.dirname(path))]
  directory = os.path.dirname(path)
  while os.path.dirname(directory) != directory:
    if os.path.basename(directory) == 'configs':
      roots.append(os.path.dirname(directory))
      break
    directory = os.path.dirname(directory)
  return list(dict.fromkeys(roots))


def _accepts_one_argument(fn):
  try:
    inspect.signature(fn).bind('arg')
    return True
  except TypeError:
    return False
  except ValueError:  # no signature (a builtin): let the call decide
    return True


@contextlib.contextmanager
def _on_sys_path(directories):
  added = [d for d in directories if d not in sys.path]
  sys.path[:0] = added
  try:
    yield
  finally:
    for d in added:
      if d in sys.path:
        sys.path.remove(d)


# -------------------------------------------------------------------------------------- overrides

def _pair_overrides(overrides):
  """('--config.a=1', '--config.b', '2') -> [('a', '1'), ('b', '2')]."""
  pairs, i, overrides = [], 0, list(overrides)
  while i < len(overrides):
    item = overrides[i]
    if '=' in item:
      key, raw = item.split('=', 1)
      i += 1
    elif i + 1 < len(overrides):
      key, raw = item, overrides[i + 1]
      i += 2
    else:
      raise ConfigError(f'override {item!r} has no value (use --config.key=value)')
    key = key.lstrip('-')
    key = key[len('config.'):] if key.startswith('config.') else key
    if not key:
      raise ConfigError(f'override {item!r} names no key')
    pairs.append((key, raw))
  return pairs


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets `config.<key>` (dotted path) to the text `raw`, converted to the field's type."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    child = node.get(part) if isinstance(node, ml_collections.ConfigDict) and part in node else None
    if not isinstance(child, ml_collections.ConfigDict):
      _unknown_key(config, key)
    node = child
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    _unknown_key(config, key)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict) and not current.keys():
    _set_mapping(node, leaf, key, raw)  # an empty group is a free mapping, e.g. custom_keys
    return
  if isinstance(current, ml_collections.ConfigDict):
    names = sorted(current.keys())
    fields = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '')
    raise ConfigError(f"config key '{key}' is a group ({fields}); override its fields, "
                      f"e.g. --config.{key}.{next(iter(sorted(current.keys())), 'x')}=...")
  expected = node.get_type(leaf)
  value = convert_value(key, raw, expected)
  if value is None and current is not None and not _is_placeholder(node, leaf):
    raise ConfigError(f"config key '{key}' expects {expected.__name__}, got None "
                      '(only placeholder fields take None)')
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:  # ml_collections' own checks, e.g. a locked config
    raise ConfigError(f"config key '{key}': cannot set {value!r}: {_one_line(e)}") from None


def _set_mapping(node, leaf, key, raw):
  """`--config.optimizer.paramwise.custom_keys="{'backbone': {'lr_mult': 0.1}}"`."""
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    value = None
  if not isinstance(value, dict):
    raise ConfigError(f"config key '{key}' is an empty group: it takes a dict literal, "
                      f"got {raw!r}")
  try:
    node[leaf] = ml_collections.ConfigDict(value)
  except (TypeError, ValueError) as e:  # e.g. a key with a dot
    raise ConfigError(f"config key '{key}': cannot set {value!r}: {_one_line(e)}") from None


def convert_value(key: str, raw: str, expected: type) -> Any:
  """`raw` text -> a value of type `expected` (the field's type; NoneType = untyped)."""
  try:
    parsed = ast.literal_eval(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    parsed = raw

  def bad(what='a'):
    return ConfigError(f"config key '{key}' expects {what} {expected.__name__}, got {raw!r}")

  if expected is type(None) or parsed is None:
    return parsed  # an untyped (None) field takes any literal; None itself is checked on set
  if expected is bool:
    if isinstance(parsed, bool):
      return parsed
    text = str(raw).strip().lower()
    if text in _TRUE:
      return True
    if text in _FALSE:
      return False
    raise bad()
  if expected is int:
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
      raise bad('an')
    if isinstance(parsed, float) and not parsed.is_integer():
      raise bad('an')
    return int(parsed)
  if expected is float:
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
      raise bad()
    return float(parsed)
  if expected is str:
    return parsed if isinstance(parsed, str) else raw
  if expected in (tuple, list):
    if not isinstance(parsed, (tuple, list)):
      raise bad()
    return expected(parsed)
  if isinstance(parsed, expected):
    return parsed
  raise bad()


def _is_placeholder(node, leaf):
  """True for fields made with `ml_collections.config_dict.placeholder(type)` (they take None)."""
  return isinstance(getattr(node, '_fields', {}).get(leaf), ml_collections.FieldReference)


def _unknown_key(config, key):
  candidates = flatten_keys(config)
  close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  raise ConfigError(f"unknown config key '{key}'{hint}")


def flatten_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list:
  """Every dotted key of `config`, groups and leaves: ['data', 'data.img_scale', ...]."""
  keys = []
  for name in config.keys():
    full = prefix + name
    keys.append(full)
    value = config[name]
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flatten_keys(value, full + '.'))
  return keys


def _one_line(error):
  return ' '.join(str(error).split())


# ------------------------------------------------------------------------------------------ saving

def save_config(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the resolved config as indented JSON (tuples as lists), atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text + '\n')
  os.replace(tmp, path)


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  return repr(value)


# ------------------------------------------------------------------------------------ entry points

def parse_args(argv: Sequence[str], known_flags: Sequence[str] | None = None, *,
               bool_flags: Sequence[str] = (), positional: str | None = None,
               usage: Usage | None = None):
  """Splits an entry point's arguments into `(spec, overrides, other_flags)`.

  `argv` (without the program name), e.g.
  `['--config', 'configs/atss.py:smoke', '--config.max_steps=5', '--workdir', 'runs/a']` ->
  `('configs/atss.py:smoke', ['--config.max_steps=5'], {'workdir': 'runs/a'})`.
  Overrides come back as '--config.key=value' strings in order. Other flags take '--name=value',
  '--name value', or a bare '--name' (-> True); dashes in names become underscores. With
  `known_flags`, any other flag is a ConfigError (with a did-you-mean). '-h' is read as '--help'.

  `bool_flags`: flags that never take the next argument as their value (a bare '--name' is
  True; '--name=false' etc. is read as a bool). `positional`: when given, arguments that are
  not flags (and everything after '--') are collected in order as `flags[positional]` (a list,
  possibly empty) instead of being an error.

  `usage` (a `Usage`, see config_help.py): the entry point's help. '-h' / '--help' then print it
  (and, with --config, the resolved config after the overrides) and '--print-config' prints the
  resolved config; both exit 0 (SystemExit) before any other check of the flags. A bad config
  or override is the usual one-line ConfigError.
  """
  spec, overrides, flags = None, [], {}
  argv, i = list(argv), 0
  bool_flags = {f.replace('-', '_') for f in bool_flags} | {'help'}
  if usage is not None:
    bool_flags.add('print_config')
    known_flags = None if known_flags is None else tuple(known_flags) + ('print_config',)
  rest = [] if positional else None

  def takes_value(j):
    return j < len(argv) and not argv[j].startswith('--')

  while i < len(argv):
    item = argv[i]
    if item == '-h':
      item = '--help'
    if rest is not None and item == '--':
      rest.extend(argv[i + 1:])
      break
    if not item.startswith('--'):
      if rest is None:
        raise ConfigError(f'unexpected argument {item!r} (flags look like --name=value)')
      rest.append(item)
      i += 1
      continue
    name, eq, value = item[2:].partition('=')
    is_bool = name.replace('-', '_') in bool_flags
    if not eq:
      if takes_value(i + 1) and not is_bool:
        value, i = argv[i + 1], i + 2
      else:
        value, i = None, i + 1
    else:
      i += 1
    if name == 'config':
      if value is None:
        raise ConfigError('--config needs a value: path/to/config.py[:arg]')
      spec = value
    elif name.startswith('config.'):
      if value is None:
        raise ConfigError(f'--{name} needs a value (--{name}=value)')
      overrides.append(f'--{name}={value}')
    else:
      flag = name.replace('-', '_')
      if known_flags is not None and flag not in known_flags and flag != 'help':
        close = difflib.get_close_matches(flag, list(known_flags), n=1)
        hint = f" (did you mean '--{close[0]}'?)" if close else ''
        raise ConfigError(f"unknown flag '--{name}'{hint}")
      if is_bool and value is not None:
        if value.strip().lower() not in _TRUE + _FALSE:
          raise ConfigError(f'--{name} takes no value (or true / false), got {value!r}')
        value = value.strip().lower() in _TRUE
      flags[flag] = True if value is None else value
  if rest is not None:
    flags[positional] = rest
  if usage is not None and (flags.get('help') or flags.get('print_config')):
    if flags.get('print_config') and spec is None:
      raise ConfigError('--print-config needs --config path/to/config.py[:arg]')
    config = None if spec is None else load_config(spec, overrides)  # errors before any output
    print_help(usage, config, spec, overrides, help_text=bool(flags.get('help')))
    raise SystemExit(0)
  if spec is None and not flags.get('help') and (usage is None or usage.config == 'required'):
    raise ConfigError('missing --config path/to/config.py[:arg]')
  return spec, overrides, flags


def main_error_exit(fn, *args, errors=(ValueError,), **kwargs):
  """Runs `fn(*args, **kwargs)` so that bad input ends the program with one line, no traceback.

  An exception in `errors` (ConfigError is a ValueError) prints `error: <message>` to stderr
  and exits with status 2 (argparse's); otherwise returns what `fn` returns. Set
  JAXDET_TRACEBACK=1 to see the full traceback too. Usage::

    if __name__ == '__main__':
      main_error_exit(main)          # main(argv=None) reads sys.argv[1:]
  """
  try:
    return fn(*args, **kwargs)
  except errors as e:
    if os.environ.get('JAXDET_TRACEBACK'):
      traceback.print_exc()
    message = _one_line(e) if isinstance(e, ConfigError) else str(e)
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)
