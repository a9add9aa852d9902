"""The demo's own training data (Magpie 1024 + greedy answers), cached where the demo finds it."""
import time
from distillspec.common.config import from_dict
from distillspec.models.loading import load_model
from distillspec.tools.configs import DemoConfig
from distillspec.tools.demo import demo_data

t = time.time()
demo = from_dict(DemoConfig, {})
target, tokenizer = load_model(demo.distill.target)
data = demo_data(demo, target, tokenizer)
print("answers", data.answers, "minutes", round((time.time() - t) / 60, 1), flush=True)
