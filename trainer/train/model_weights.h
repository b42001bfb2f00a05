// A model's parameters in checkpoints: the slice a rank writes and the box it reads for each
// parameter (its own box of a split one: Parameter::offset), and loading a model's weights alone
// (checkpoint.init_from, grpo.init_checkpoint: a run starts from another checkpoint's weights, e.g.
// a `dsx convert from-hf` import; optimizer, step and data start fresh).
#pragma once
#include <filesystem>
#include <string>

#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/parameters.h"

namespace dsx {

// p's value as the checkpoint tensor `prefix` + its name.
ckpt::TensorSlice parameter_slice(Parameter& p, const std::string& prefix = "");
// A request filling p's value from the checkpoint tensor `prefix` + its name.
ckpt::LoadRequest parameter_request(Parameter& p, const std::string& prefix = "");

// Fills every parameter of `params` from the model tensors of the checkpoint `from`: a checkpoint
// directory, or a root (its newest complete one). Returns the checkpoint read. Throws
// dsx::UserError starting with `key`, the recipe key that named `from`.
std::filesystem::path load_model_weights(ParameterStore& params, const std::string& from, const std::string& key);

}  // namespace dsx
