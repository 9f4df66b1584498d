// Search the exported approximate index (mp4sr-rt export --ann) through FAISS's C++ API.
//
//   ann_search ARTIFACT_DIR USER_VECTOR_FILE [K]
//
// USER_VECTOR_FILE holds one user vector, `dim` float32 values (the scorer's `user` output, or
// history_encoder's): a service computes it with onnxruntime as score.cc does. Prints the top K
// (default 10) as "item_id<TAB>score" lines, best first: the index's candidates with their exact
// inner products (IVF-Flat stores the rows in full precision; IVF-PQ scans 4-bit codes and HNSW walks
// an fp16 graph, and both rank their candidates again on the full-precision rows, IndexRefineFlat).
// Everything comes from manifest.json
// (docs/artifacts.md): the index file, its kind and the search setting the export tuned.

#include <faiss/IndexHNSW.h>
#include <faiss/IndexIVF.h>
#include <faiss/IndexRefine.h>
#include <faiss/index_io.h>

#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " ARTIFACT_DIR USER_VECTOR_FILE [K]\n";
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t k = argc > 3 ? std::stoll(argv[3]) : 10;
  const mp4sr_json::Json manifest = mp4sr_json::ReadJson(dir + "/manifest.json");
  if (manifest["schema"].string != "mp4sr-artifacts/2") throw std::runtime_error("unsupported manifest schema");
  const mp4sr_json::Json& ann = manifest["ann"];
  if (ann.kind != mp4sr_json::Json::Object) throw std::runtime_error("these artifacts carry no index (export --ann)");
  const auto dim = static_cast<size_t>(manifest["dim"].number);

  std::vector<float> user(dim);
  std::ifstream in(argv[2], std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(user.data()), static_cast<std::streamsize>(dim * sizeof(float)))) {
    throw std::runtime_error("cannot read " + std::to_string(dim) + " float32 values from " + argv[2]);
  }

  std::unique_ptr<faiss::Index> index(faiss::read_index((dir + "/" + ann["file"].string).c_str()));
  std::vector<float> scores(k);
  std::vector<faiss::Index::idx_t> positions(k);
  if (ann["kind"].string == "ivf") {
    faiss::SearchParametersIVF params;
    params.nprobe = static_cast<size_t>(ann["search"]["nprobe"].number);
    index->search(1, user.data(), k, scores.data(), positions.data(), &params);
  } else if (ann["kind"].string == "ivf-pq") {
    // The nprobe goes to the IVF lists under the IndexRefineFlat (its k_factor is in the file).
    auto* refine = dynamic_cast<faiss::IndexRefine*>(index.get());
    auto* lists = dynamic_cast<faiss::IndexIVF*>(refine != nullptr ? refine->base_index : nullptr);
    if (lists == nullptr) throw std::runtime_error("ann.kind is ivf-pq but the index is not IVF under a refine index");
    lists->nprobe = static_cast<size_t>(ann["search"]["nprobe"].number);
    index->search(1, user.data(), k, scores.data(), positions.data());
  } else {
    // The efSearch goes to the graph: under the IndexRefineFlat (its k_factor is in the file), or
    // the index itself in artifacts of earlier exports (HNSW-Flat).
    auto* refine = dynamic_cast<faiss::IndexRefine*>(index.get());
    auto* graph = dynamic_cast<faiss::IndexHNSW*>(refine != nullptr ? refine->base_index : index.get());
    if (graph == nullptr) throw std::runtime_error("ann.kind is hnsw but the index is not an HNSW graph");
    graph->hnsw.efSearch = static_cast<int>(ann["search"]["ef_search"].number);
    index->search(1, user.data(), k, scores.data(), positions.data());
  }
  // Row position p is item index p + 1, that is items[p] of the vocabulary.
  const mp4sr_json::Json vocabulary = mp4sr_json::ReadJson(dir + "/" + manifest["vocabulary"].string);
  const std::vector<mp4sr_json::Json>& items = vocabulary["items"].array;
  std::cout.precision(7);
  for (int64_t r = 0; r < k && positions[r] >= 0; ++r) {
    std::cout << items.at(static_cast<size_t>(positions[r])).string << '\t' << scores[r] << '\n';
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << '\n';
  return 1;
}
