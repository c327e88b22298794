"""The activation verbalizer (AV): an LLM that reads one activation vector, injected as the
embedding of a marker token in a fixed prompt, and writes an explanation of it.

How the vector goes in is described by a sidecar YAML (our version of NLA's
`nla_meta.yaml`): the prompt template with one marker character, the marker's token id and
its left/right neighbour ids (checked against the tokenizer: a broken prompt is an error,
never generated from), the injection scale (the vector is rescaled to this L2 norm and
*replaces* the marker's row), the factor applied to every other row (√d_model for Gemma,
whose embedding layer scales its rows), the extraction layer, sampling settings and the
stop string.

The prompt embeddings are built here, engine-independently (`PromptEmbeddings`), and handed
to one of two engines:

* `transformers` (`Verbalizer`): `generate(inputs_embeds=...)`, CPU or GPU; also the only
  engine for a self-verbalizer injecting into the residual stream (`inject_layer > 0`);
* `vllm` (`baez_ray.av.vllm_engine.VLLMVerbalizer`): `vllm.LLM(enable_prompt_embeds=True)`
  fed the same `[T, d]` tensors as `{"prompt_embeds": ...}` (GPU; the CPU build in tests).

Both engines get identical tensors: the other rows are the raw embedding rows times
`other_rows_scale` (computed in the weight dtype, as Gemma's own embedding module does), and
neither engine scales `inputs_embeds` / `prompt_embeds` again (HF Gemma3 scales inside its
embedding module, which `inputs_embeds` skips; vLLM's Gemma3 scales in `embed_input_ids`,
which `prompt_embeds` skip). Generated tokens are embedded by the model itself in both.

Where no trained AV exists (small models), `self_verbalizer: true` makes the base model
itself read the vector (Patchscopes/SelfIE style), injected at the input embeddings
(`inject_layer: 0`) or into the residual stream after block `inject_layer - 1`. Its
outputs say so (`verbalizer = "self"`).

Modules: `sidecar` (the YAML and NLA's nla_meta.yaml), `prompt` (prompt ids and embeddings,
engine-independent), `hf_engine` (transformers), `vllm_engine` (vLLM), `worker` (the Ray
Data actor and the pool that runs it).
"""
