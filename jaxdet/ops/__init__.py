"""Box ops, box coders, NMS, max pooling, convolution with a CPU-fast kernel gradient and
deformable convolution: pure jnp, no Flax, no config."""
from jaxdet.ops.boxes import (box_area, box_cxcywh_to_xyxy, box_iof, box_iou, box_iou_aligned,
                              box_xyxy_to_cxcywh, clip_boxes, generalized_box_iou,
                              generalized_box_iou_aligned)
from jaxdet.ops.coders import delta_decode, delta_encode, distance_decode, distance_encode
from jaxdet.ops.conv import conv_general_dilated
from jaxdet.ops.deform_conv import deform_conv2d
from jaxdet.ops.nms import (NMSOutput, Predictions, batched_nms, filter_scores_and_topk,
                            multiclass_nms)
from jaxdet.ops.pooling import max_pool2d
