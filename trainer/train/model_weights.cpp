#include "trainer/train/model_weights.h"

#include <vector>

#include "kernels/error.h"

namespace dsx {

ckpt::TensorSlice parameter_slice(Parameter& p, const std::string& prefix) {
  return {prefix + p.spec.name, p.spec.shape, p.offset, p.value};
}

ckpt::LoadRequest parameter_request(Parameter& p, const std::string& prefix) {
  return {prefix + p.spec.name, p.spec.shape, p.offset, p.value};
}

std::filesystem::path load_model_weights(ParameterStore& params, const std::string& from, const std::string& key) {
  std::filesystem::path dir = from;
  if (!ckpt::is_checkpoint_dir(dir)) {
    const auto newest = std::filesystem::is_directory(dir) ? ckpt::latest(dir) : std::nullopt;
    if (!newest) throw UserError(key + ": " + from + " is neither a checkpoint nor a directory holding one");
    dir = *newest;
  }
  std::vector<ckpt::LoadRequest> requests;
  for (Parameter& p : params) requests.push_back(parameter_request(p));
  try {
    ckpt::CheckpointReader(dir).read(requests);
  } catch (const UserError& e) {
    throw UserError(key + ": " + e.what());
  }
  return dir;
}

}  // namespace dsx
