#include "data/prompts.h"

#include <fmt/core.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/permutation.h"
#include "kernels/error.h"

namespace dsx::data {
using json = nlohmann::json;

namespace {

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\n") == std::string_view::npos;
}

// The answer field: strings as they are, numbers and booleans as their JSON text ("42").
std::string answer_text(const json& value, const std::string& where) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_number() || value.is_boolean()) return value.dump();
  throw UserError(fmt::format("{}: field 'answer' must be a string, number or boolean", where));
}

Prompt parse_prompt_line(const std::string& line, const std::string& where) {
  json doc;
  try {
    doc = json::parse(line);
  } catch (const json::parse_error& e) {
    throw UserError(fmt::format("{}: invalid JSON: {}", where, e.what()));
  }
  if (!doc.is_object()) throw UserError(fmt::format("{}: expected a JSON object", where));
  auto prompt = doc.find("prompt");
  if (prompt == doc.end()) throw UserError(fmt::format("{}: field 'prompt' is missing", where));
  if (!prompt->is_string()) throw UserError(fmt::format("{}: field 'prompt' must be a string", where));
  auto answer = doc.find("answer");
  if (answer == doc.end()) throw UserError(fmt::format("{}: field 'answer' is missing", where));
  Prompt p;
  p.prompt = prompt->get<std::string>();
  p.answer = answer_text(*answer, where);
  doc.erase("prompt");
  doc.erase("answer");
  p.extra_json = doc.dump();
  return p;
}

}  // namespace

PromptSet PromptSet::load(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw UserError(fmt::format("'{}': no such prompt file", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError(fmt::format("'{}': cannot be read", path));
  std::vector<Prompt> prompts;
  std::string line;
  for (int64_t line_no = 1; std::getline(in, line); ++line_no) {
    if (is_blank(line)) continue;
    Prompt p = parse_prompt_line(line, fmt::format("{}:{}", path, line_no));
    p.index = static_cast<int64_t>(prompts.size());
    prompts.push_back(std::move(p));
  }
  if (in.bad()) throw UserError(fmt::format("'{}': read error", path));
  if (prompts.empty()) throw UserError(fmt::format("'{}': holds no prompts", path));
  return from_prompts(std::move(prompts), path);
}

PromptSet PromptSet::from_prompts(std::vector<Prompt> prompts, std::string origin) {
  if (prompts.empty()) throw UserError(fmt::format("'{}': holds no prompts", origin));
  PromptSet set;
  set.prompts_ = std::move(prompts);
  set.origin_ = std::move(origin);
  return set;
}

// =========================================================================================

std::string PromptLoaderState::to_json() const {
  return json{{"version", kVersion},
              {"seed", seed},
              {"prompts", prompts},
              {"consumed_samples", consumed_samples},
              {"steps", steps}}
      .dump();
}

PromptLoaderState PromptLoaderState::from_json(std::string_view text, const std::string& origin) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    throw UserError(fmt::format("{}: prompt loader state is not valid JSON: {}", origin, e.what()));
  }
  const auto field = [&](const char* key) -> const json& {
    auto it = doc.find(key);
    if (!doc.is_object() || it == doc.end() || !it->is_number_integer()) {
      throw UserError(fmt::format("{}: prompt loader state needs an integer '{}'", origin, key));
    }
    return *it;
  };
  if (field("version").get<int>() > kVersion) {
    throw UserError(fmt::format("{}: prompt loader state version {} is newer than the version {} this dsx reads",
                                origin, field("version").get<int>(), kVersion));
  }
  PromptLoaderState s;
  s.seed = field("seed").get<uint64_t>();
  s.prompts = field("prompts").get<int64_t>();
  s.consumed_samples = field("consumed_samples").get<int64_t>();
  s.steps = field("steps").get<int64_t>();
  return s;
}

PromptLoader::PromptLoader(std::shared_ptr<const PromptSet> set, PromptLoaderConfig config)
    : set_(std::move(set)), config_(config) {
  if (!set_ || set_->size() == 0) throw UserError("prompt loader: the prompt set is empty");
  if (config_.dp_size < 1) throw UserError(fmt::format("DP size {} must be at least 1", config_.dp_size));
  if (config_.dp_rank < 0 || config_.dp_rank >= config_.dp_size) {
    throw UserError(fmt::format("DP rank {} is outside 0..{}", config_.dp_rank, config_.dp_size - 1));
  }
  if (config_.global_batch < 1 || config_.global_batch % config_.dp_size != 0) {
    throw UserError(fmt::format("prompt global batch {} must be a positive multiple of the DP size {}",
                                config_.global_batch, config_.dp_size));
  }
}

PromptBatch PromptLoader::next() {
  const auto n = static_cast<int64_t>(set_->size());
  const int64_t per_rank = config_.global_batch / config_.dp_size;
  PromptBatch batch;
  batch.step = steps_;
  batch.first_global_sample = consumed_samples_ + config_.dp_rank * per_rank;
  batch.epoch = batch.first_global_sample / n;
  for (int64_t i = 0; i < per_rank; ++i) {
    const int64_t g = batch.first_global_sample + i;
    const int64_t epoch = g / n;
    const SeededPermutation perm(static_cast<uint64_t>(n), mix_key(config_.seed, epoch));
    batch.prompts.push_back((*set_)[perm(static_cast<uint64_t>(g % n))]);
  }
  consumed_samples_ += config_.global_batch;
  steps_ += 1;
  return batch;
}

PromptLoaderState PromptLoader::state() const {
  return {config_.seed, static_cast<int64_t>(set_->size()), consumed_samples_, steps_};
}

void PromptLoader::restore(const PromptLoaderState& state) {
  if (state.seed != config_.seed || state.prompts != static_cast<int64_t>(set_->size())) {
    throw UserError(fmt::format("prompt loader state (seed {}, {} prompts) does not match '{}' (seed {}, {} prompts)",
                                state.seed, state.prompts, set_->origin(), config_.seed, set_->size()));
  }
  if (state.consumed_samples < 0 || state.steps < 0) throw UserError("prompt loader state has negative counters");
  consumed_samples_ = state.consumed_samples;
  steps_ = state.steps;
}

}  // namespace dsx::data
