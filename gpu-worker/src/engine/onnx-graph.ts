import { closeSync, openSync, writeSync } from 'node:fs'
import { basename } from 'node:path'
import onnxProto from 'onnx-proto'

// A small ONNX graph writer: nodes and value infos go into the protobuf, large
// initializers stream into one external-data file as they are added, so a
// checkpoint of any size is exported without holding it in memory twice.

const { onnx } = onnxProto
export const DataType = onnx.TensorProto.DataType
export type ElemType = 'float32' | 'float16' | 'int64' | 'int32' | 'uint8'

const ELEM: Record<ElemType, number> = {
  float32: DataType.FLOAT,
  float16: DataType.FLOAT16,
  int64: DataType.INT64,
  int32: DataType.INT32,
  uint8: DataType.UINT8,
}

export type Dim = number | string
export type AttrValue = number | string | number[] | { float: number }

/** Initializers at least this large go to the external data file. */
const EXTERNAL_MIN_BYTES = 1024

export class OnnxGraphWriter {
  private readonly nodes: InstanceType<typeof onnx.NodeProto>[] = []
  private readonly inputs: InstanceType<typeof onnx.ValueInfoProto>[] = []
  private readonly outputs: InstanceType<typeof onnx.ValueInfoProto>[] = []
  private readonly initializers: InstanceType<typeof onnx.TensorProto>[] = []
  private readonly dataFd: number
  private dataOffset = 0
  private nameCounter = 0
  private readonly int64Consts = new Map<string, string>()
  readonly dataFile: string

  constructor(dataFile: string) {
    this.dataFile = dataFile
    this.dataFd = openSync(dataFile, 'w')
  }

  /** A fresh value name with a readable prefix. */
  fresh(prefix: string): string {
    return `${prefix}_${this.nameCounter++}`
  }

  input(name: string, type: ElemType, shape: Dim[]): string {
    this.inputs.push(valueInfo(name, type, shape))
    return name
  }

  output(name: string, type: ElemType, shape: Dim[]): string {
    this.outputs.push(valueInfo(name, type, shape))
    return name
  }

  /** Adds an initializer; big ones stream to the external data file. */
  initializer(name: string, type: ElemType, dims: number[], data: ArrayBufferView): string {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    const tensor = onnx.TensorProto.create({ name, dataType: ELEM[type], dims })
    if (bytes.byteLength >= EXTERNAL_MIN_BYTES) {
      // Page-align large tensors so the runtime can map them directly.
      const align = bytes.byteLength >= 1 << 20 ? 4096 : 64
      const pad = (align - (this.dataOffset % align)) % align
      if (pad) writeSync(this.dataFd, new Uint8Array(pad))
      this.dataOffset += pad
      writeSync(this.dataFd, bytes)
      tensor.dataLocation = onnx.TensorProto.DataLocation.EXTERNAL
      tensor.externalData = [
        { key: 'location', value: basename(this.dataFile) },
        { key: 'offset', value: String(this.dataOffset) },
        { key: 'length', value: String(bytes.byteLength) },
      ].map((e) => onnx.StringStringEntryProto.create(e))
      this.dataOffset += bytes.byteLength
    } else {
      tensor.rawData = Uint8Array.from(bytes)
    }
    this.initializers.push(tensor)
    return name
  }

  /** A small int64 constant (shapes, axes, indices); equal constants are written once. */
  constInt64(values: number[], dims: number[] = [values.length]): string {
    const key = `${dims.join(',')}:${values.join(',')}`
    let name = this.int64Consts.get(key)
    if (name === undefined) {
      name = this.initializer(this.fresh('const'), 'int64', dims, BigInt64Array.from(values.map(BigInt)))
      this.int64Consts.set(key, name)
    }
    return name
  }

  /**
   * Adds a node; returns its output names. Pass output names to fix them
   * (graph outputs), or a count to have them generated.
   */
  node(
    op: string,
    inputs: string[],
    outputs: string[] | number = 1,
    attrs: Record<string, AttrValue> = {},
    domain = '',
  ): string[] {
    const outs = typeof outputs === 'number' ? Array.from({ length: outputs }, () => this.fresh(op)) : outputs
    const attribute = Object.entries(attrs).map(([name, v]) => attribute_(name, v))
    this.nodes.push(onnx.NodeProto.create({ opType: op, input: inputs, output: outs, attribute, domain }))
    return outs
  }

  /** Shorthand for a node with one output. */
  op(op: string, inputs: string[], attrs: Record<string, AttrValue> = {}, domain = ''): string {
    return this.node(op, inputs, 1, attrs, domain)[0]!
  }

  /** Finishes the external data and returns the serialised model. */
  finish(name: string): Uint8Array {
    closeSync(this.dataFd)
    const graph = onnx.GraphProto.create({
      name,
      node: this.nodes,
      input: this.inputs,
      output: this.outputs,
      initializer: this.initializers,
    })
    const model = onnx.ModelProto.create({
      irVersion: 10,
      producerName: 'moe-edge',
      producerVersion: '0.1.0',
      graph,
      opsetImport: [
        { domain: '', version: 21 },
        { domain: 'com.microsoft', version: 1 },
      ],
    })
    return onnx.ModelProto.encode(model).finish()
  }
}

function valueInfo(name: string, type: ElemType, shape: Dim[]) {
  const dim = shape.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d }))
  return onnx.ValueInfoProto.create({
    name,
    type: { tensorType: { elemType: ELEM[type], shape: { dim } } },
  })
}

function attribute_(name: string, v: AttrValue) {
  const T = onnx.AttributeProto.AttributeType
  if (typeof v === 'string')
    return onnx.AttributeProto.create({ name, type: T.STRING, s: new TextEncoder().encode(v) })
  if (Array.isArray(v)) return onnx.AttributeProto.create({ name, type: T.INTS, ints: v })
  if (typeof v === 'object') return onnx.AttributeProto.create({ name, type: T.FLOAT, f: v.float })
  return onnx.AttributeProto.create({ name, type: T.INT, i: v })
}
