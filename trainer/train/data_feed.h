// Where the training loop gets its micro-batches: the recipe's synthetic source or the HDF5
// token loader, behind one interface. Both define the order on global sample indices and
// report their position as JSON for the checkpoint.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "trainer/model/model.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

class DataFeed {
 public:
  virtual ~DataFeed() = default;
  // This rank's micro-batches for the next step of global_batch sequences.
  virtual std::vector<Batch> next_step(int64_t global_batch) = 0;
  virtual nlohmann::json state() const = 0;
  virtual void restore(const nlohmann::json& state) = 0;
  virtual std::string describe() const = 0;
};

// dp_rank/dp_size: this rank's slice of every global batch.
std::unique_ptr<DataFeed> make_data_feed(const Recipe& recipe, int dp_rank, int dp_size);

}  // namespace dsx
