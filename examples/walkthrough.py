# %% [markdown]
# # Cortex walk-through (notebook style: run cell by cell in VS Code or Jupyter)

# %%
import cortex

model, tokenizer = cortex.load()
print(model.config)

# %% Greedy text is reproducible; sampling is reproducible with a seed.
prompt = "Once upon a time, there was a little robot who"
print(cortex.generate(model, tokenizer, prompt, max_tokens=40))
print(cortex.generate(model, tokenizer, prompt, max_tokens=40, temperature=0.9, top_p=0.95, seed=42))

# %% Stop strings of any length; the text before the stop string is returned.
print(cortex.generate(model, tokenizer, "List three fruits:\n1.", max_tokens=60, stop=["\n3."]))

# %% Chat templates come from the model file.
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a color."},
]
print(tokenizer.apply_chat_template(messages))
print(cortex.generate(model, tokenizer, messages, max_tokens=20))

# %% Bad input is a clear, typed error.
try:
    cortex.SamplingParams(temperature=-1)
except cortex.RequestValidationError as err:
    print(type(err).__name__, err.param, err)
