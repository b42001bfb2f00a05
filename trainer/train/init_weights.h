// checkpoint.init_from: a run that does not resume starts from a checkpoint's model weights (e.g.
// a `dsx convert from-hf` import, or another run's checkpoint); optimizer, step and data start fresh.
#pragma once
#include <filesystem>
#include <string>

#include "trainer/model/parameters.h"

namespace dsx {

// Fills every parameter of `params` (its own box of a split one: Parameter::offset) from the model
// tensors of the checkpoint `from`: a checkpoint directory, or a root (its newest complete one).
// Returns the checkpoint read. Throws dsx::UserError naming checkpoint.init_from.
std::filesystem::path load_model_weights(ParameterStore& params, const std::string& from);

}  // namespace dsx
