"""The eight gyms, one module each: its Env class, prompts, scripted roles, world, data generator, original-data
loader and expert. `envs.GYMS` is the registry; a new gym is a module here plus one line there.

`envs` is imported first: it defines the interface the gym modules build on and then imports them to fill
GYMS, so `import gyms.travel` (or `python -m gyms.travel`) and `import envs` both work in any order.
"""
import warnings

# `python -m gyms.travel` runs gyms/travel.py as __main__ after envs has imported it as gyms.travel, which
# runpy warns about. Both copies only regenerate or read data, so the warning is noise.
warnings.filterwarnings("ignore", message=r".*'gyms\.\w+' found in sys\.modules", category=RuntimeWarning)

import envs  # noqa: E402,F401
