// Score one history with the exported MP4SR scorer through onnxruntime's C++ API.
//
//   score ARTIFACT_DIR ITEM_ID [ITEM_ID ...]     (the history, oldest first, original item ids)
//
// Prints the top 10 (at most the manifest's top_k) as "item_id<TAB>score" lines, best first.
// Exit status 3: the scorer scans in int8 and its bound cannot certify these 10 (see below).
// Everything comes from the artifact directory's manifest.json (docs/artifacts.md): the scorer
// file, its input and output names, max_len, the vocabulary file. The small JSON reader
// (json.h) covers what manifest.json and items.json use; a real service would use its JSON library
// and also check each file's sha256 against the manifest.

#include <onnxruntime_cxx_api.h>

#include "json.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using mp4sr_json::Json;
using mp4sr_json::ReadJson;

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " ARTIFACT_DIR ITEM_ID [ITEM_ID ...]\n";
    return 2;
  }
  const std::string dir = argv[1];
  const Json manifest = ReadJson(dir + "/manifest.json");
  if (manifest["schema"].string != "mp4sr-artifacts/2" || manifest["padding"].string != "right") {
    throw std::runtime_error("unsupported manifest schema or padding: " + manifest["schema"].string);
  }
  const Json& scorer = manifest["models"]["scorer"];
  const auto max_len = static_cast<size_t>(manifest["max_len"].number);

  // Item index i + 1 is items[i] of the vocabulary; index 0 is padding.
  const Json vocabulary = ReadJson(dir + "/" + manifest["vocabulary"].string);
  const std::vector<Json>& items = vocabulary["items"].array;
  std::map<std::string, int64_t> index;
  for (size_t i = 0; i < items.size(); ++i) index[items[i].string] = static_cast<int64_t>(i) + 1;

  // One history needs no padding: shape [1, L], its most recent max_len items.
  std::vector<int64_t> ids;
  for (int a = std::max(2, argc - static_cast<int>(max_len)); a < argc; ++a) {
    auto it = index.find(argv[a]);
    if (it == index.end()) throw std::runtime_error(std::string("unknown item id: ") + argv[a]);
    ids.push_back(it->second);
  }

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "mp4sr-score");
  Ort::SessionOptions options;
  Ort::Session session(env, (dir + "/" + scorer["file"].string).c_str(), options);
  const int64_t shape[2] = {1, static_cast<int64_t>(ids.size())};
  Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value input = Ort::Value::CreateTensor<int64_t>(memory, ids.data(), ids.size(), shape, 2);

  // Manifest order: input ids; outputs scores, items, user, and with an int8 catalogue scan
  // (export --int8-scan) bound: no item left out of the top K scores above it.
  const std::vector<Json>& outputs = scorer["outputs"].array;
  const bool has_bound = outputs.size() > 3 && outputs[3]["name"].string == "bound";
  const std::string input_name = scorer["inputs"].array.at(0)["name"].string;
  std::vector<std::string> names = {outputs.at(0)["name"].string, outputs.at(1)["name"].string};
  if (has_bound) names.push_back(outputs[3]["name"].string);
  const char* input_names[] = {input_name.c_str()};
  std::vector<const char*> output_names;
  for (const std::string& name : names) output_names.push_back(name.c_str());
  std::vector<Ort::Value> out = session.Run(Ort::RunOptions{nullptr}, input_names, &input, 1,
                                            output_names.data(), output_names.size());

  const float* scores = out[0].GetTensorData<float>();
  const int64_t* top = out[1].GetTensorData<int64_t>();
  const int64_t k = std::min<int64_t>(10, out[1].GetTensorTypeAndShapeInfo().GetShape()[1]);
  std::cout.precision(7);
  for (int64_t r = 0; r < k; ++r) {
    std::cout << items.at(static_cast<size_t>(top[r] - 1)).string << '\t' << scores[r] << '\n';
  }
  // The top k is exact when its k-th score reaches the bound; otherwise an item the int8 scan
  // left out may belong in it, and a service ranks this history again in full precision
  // (user output . item_table.npy, or the table rebuilt from item_inputs.npy, docs/artifacts.md).
  if (has_bound && scores[k - 1] < out[2].GetTensorData<float>()[0]) {
    std::cerr << "not certified: rank this history again in full precision\n";
    return 3;
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << '\n';
  return 1;
}
