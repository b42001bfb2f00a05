#include "trainer/train/init_weights.h"

#include <vector>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"

namespace dsx {

std::filesystem::path load_model_weights(ParameterStore& params, const std::string& from) {
  std::filesystem::path dir = from;
  if (!ckpt::is_checkpoint_dir(dir)) {
    const auto newest = std::filesystem::is_directory(dir) ? ckpt::latest(dir) : std::nullopt;
    if (!newest) {
      throw UserError("checkpoint.init_from: " + from + " is neither a checkpoint nor a directory holding one");
    }
    dir = *newest;
  }
  std::vector<ckpt::LoadRequest> requests;
  for (Parameter& p : params) requests.push_back({p.spec.name, p.spec.shape, p.offset, p.value});
  ckpt::CheckpointReader(dir).read(requests);
  return dir;
}

}  // namespace dsx
