// What commands that read a trained checkpoint (generate, convert) share: finding the checkpoint
// and the model it holds.
#pragma once
#include <filesystem>
#include <string>

#include "trainer/checkpoint/checkpoint.h"
#include "trainer/recipe/recipe.h"

namespace dsx::cli {

// A checkpoint directory as given, or the newest complete one under a checkpoint root. `what`
// starts the error messages ("generate: --checkpoint").
std::filesystem::path resolve_checkpoint(const std::string& dir, const std::string& what);

// The model section of the checkpoint's recipe. Only `model` (and train.seq_len, which validation
// compares with it) is kept: the other sections name files of the training run (datasets,
// tokenizer, prompt sets) that need not exist where the checkpoint is used. `command` starts
// the error messages.
ModelSection checkpoint_model(const std::string& recipe_yaml, const std::filesystem::path& dir,
                              const std::string& command);

// The prefix of the model tensors to read: "" for the trained weights, or with `ema` the weight
// EMA's "ema." (trainer/optim/weight_ema.h), after checking the checkpoint holds one.
std::string weights_prefix(const ckpt::CheckpointReader& reader, bool ema, const std::string& command);

}  // namespace dsx::cli
